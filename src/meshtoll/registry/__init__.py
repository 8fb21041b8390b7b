"""The registry of run-time tenants and keys, the pure core: the records the shared store
holds (records), and what a registry store promises (store.TenantRegistry). The stores
themselves (memory, Redis) are in meshtoll.storage; compiling records into the decision's
indexes is meshtoll.policy's, keeping every instance in step meshtoll.tenants'."""
