"""The billing targets usage is delivered to, one adapter each over its HTTP API
(sinks/delivery.py's Sink): OpenMeter, Lago, Stripe. `open_sink` builds one from a target's
name and URL, its credential from the environment (never a flag, never a log)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshtoll.sinks.delivery import Sink
from meshtoll.sinks.names import BillingNames, StripeApi, Target
from meshtoll.targets import lago, openmeter, stripe
from meshtoll.targets.http import TIMEOUT_SECONDS

CREDENTIAL_VARIABLES: dict[Target, str] = {
    "openmeter": openmeter.TOKEN_VARIABLE,
    "lago": lago.API_KEY_VARIABLE,
    "stripe": stripe.API_KEY_VARIABLE,
}


def open_sink(
    target: Target,
    url: str,
    names: Callable[[], BillingNames],
    environ: Mapping[str, str],
    *,
    cloudevents_source: str,
    stripe_api: StripeApi = "v2",
    timeout: float = TIMEOUT_SECONDS,
) -> Sink:
    """`timeout` bounds each HTTP call's every wait (connect, write, read)."""
    credential = environ.get(CREDENTIAL_VARIABLES[target]) or None
    if target == "openmeter":
        return openmeter.OpenMeterSink(url, credential, names, cloudevents_source, timeout)
    if target == "lago":
        return lago.LagoSink(url, credential, names, timeout)
    return stripe.StripeSink(url, credential, names, stripe_api, timeout)
