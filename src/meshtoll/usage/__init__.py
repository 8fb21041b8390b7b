"""Usage, the pure core of metering: one record per request (records), the admissions authz
records and the units ext_proc reports (records, recorder), the usage hash's fields
(tallies) and what a usage store promises (store.UsageStore)."""
