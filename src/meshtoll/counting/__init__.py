"""Counting, the pure core of limits and quotas: what a limit is (limits), how its window is
measured (periods), how each algorithm admits (algorithms) and what a counter store
promises (store.CounterStore). No I/O, and nothing of meshtoll's services: everything may
import it."""
