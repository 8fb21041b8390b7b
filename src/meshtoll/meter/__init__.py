"""Metering and billing on top of usage/: Envoy's access logs in (als, otlp, log_line),
settled against authz's admissions (settle) or billed from them when no log comes
(reconcile); invoices from the usage store and the plans' prices (billing, pricing,
billing_periods), usage reports and exports for billing systems. What a usage record is and
what a usage store promises is usage/'s."""
