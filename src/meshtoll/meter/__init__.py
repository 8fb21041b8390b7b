"""Metering and billing: usage records, the usage store, invoices and exports."""
