"""Hot reload: new versions swap in whole, bad versions never replace the last good one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshtoll.policy import CompiledPolicy, load_policy
from meshtoll.policy.reload import PolicyHolder
from meshtoll.server.exported import export_policy
from meshtoll.telemetry.metrics import Metrics
from meshtoll.watched import LOGGED_PROBLEMS, Fingerprint, Watched, file_fingerprint
from tests.waiting import eventually_async

POLL = 0.02


def version(tenants: str) -> str:
    names = "".join(f"  {name}: {{plan: free}}\n" for name in tenants.split())
    return f"plans: {{free: {{}}}}\ntenants:\n{names}"


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[PolicyHolder]:
    holder = PolicyHolder.from_file(path)
    task = asyncio.create_task(holder.watch(POLL))
    try:
        yield holder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def write(path: Path, text: str) -> None:
    # Written aside and renamed in, as editors and config tools do: never half a file.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_a_changed_file_becomes_the_active_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        first = holder.current
        write(path, version("acme globex"))
        await eventually_async(
            lambda: "globex" in holder.current.tenants,
            timeout=5,
            message="the version with globex never became active",
        )
        assert holder.version == 2
        # A decision that took the old object keeps a consistent view of it.
        assert set(first.tenants) == {"acme"}


async def test_an_invalid_version_is_rejected_and_the_last_good_one_stays(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        write(path, "plans: {free: {}}\ntenants: {acme: {plan: gold}}\n")
        await eventually_async(
            lambda: holder.rejected_versions == 1, timeout=5, message="the bad version was never rejected"
        )
        assert set(holder.current.tenants) == {"acme"}
        assert holder.version == 1
        write(path, version("globex"))
        await eventually_async(
            lambda: "globex" in holder.current.tenants,
            timeout=5,
            message="the version with globex never became active",
        )


async def test_a_configmap_style_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    # Kubernetes mounts policy.yaml -> ..data/policy.yaml and swaps ..data atomically.
    first, second = tmp_path / "..2026_11_25_01", tmp_path / "..2026_11_25_02"
    first.mkdir()
    second.mkdir()
    (first / "policy.yaml").write_text(version("acme"))
    (second / "policy.yaml").write_text(version("acme initech"))
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "policy.yaml"
    path.symlink_to("..data/policy.yaml")
    async with watching(path) as holder:
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await eventually_async(
            lambda: "initech" in holder.current.tenants,
            timeout=5,
            message="the version with initech never became active",
        )


async def test_a_vanished_file_keeps_the_policy_until_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    polls_without_file = 0

    def counted(watched: Path) -> Fingerprint | None:
        nonlocal polls_without_file
        found = file_fingerprint(watched)
        polls_without_file += found is None
        return found

    holder = Watched(path, load_policy, log=logging.getLogger("test"), fingerprint=counted, describe=str)
    task = asyncio.create_task(holder.watch(POLL))
    try:
        path.unlink()
        await eventually_async(
            lambda: polls_without_file,
            lambda polls: polls >= 5,
            timeout=5,
            message="the watcher did not look for the vanished file five times",
        )
        assert set(holder.current.tenants) == {"acme"}  # nothing changed meanwhile
        write(path, version("globex"))
        await eventually_async(
            lambda: "globex" in holder.current.tenants,
            timeout=5,
            message="the version with globex never became active",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("listeners", [1, 2])
async def test_listeners_hear_each_accepted_version(tmp_path: Path, listeners: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    heard: list[int] = []
    async with watching(path) as holder:
        for _ in range(listeners):
            holder.on_change(lambda policy: heard.append(len(policy.tenants)))
        write(path, version("acme globex"))
        await eventually_async(
            lambda: len(heard) == listeners, timeout=5, message="not every listener heard the new version"
        )
        assert heard == [2] * listeners


HOSTILE_VERSIONS = {
    "a NUL byte": "plans: {free: {}}\x00\ntenants: {}\n",
    "a null key": "~: 1\n",
    "an integer of 5,000 digits": "plans: {free: {limits: [{requests: " + "9" * 5000 + ", per: second}]}}\n",
    "an alias bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    ),
}


async def test_no_hostile_version_ends_the_watcher_and_each_is_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        for count, text in enumerate(HOSTILE_VERSIONS.values(), start=1):
            write(path, text)
            await eventually_async(
                lambda: holder.rejected_versions == count,  # noqa: B023 (awaited before the loop moves on)
                timeout=5,
                message=f"rejection {count} was never counted",
            )
            assert set(holder.current.tenants) == {"acme"}
        # A later edit (here: acme gone, as when a tenant's access is withdrawn) still applies.
        write(path, version("globex"))
        await eventually_async(
            lambda: set(holder.current.tenants) == {"globex"},
            timeout=5,
            message="the version with globex never became active",
        )
    rejections = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(rejections) == len(HOSTILE_VERSIONS)
    assert all(str(path) in record.getMessage() for record in rejections)


async def test_an_unexpected_loader_failure_is_logged_counted_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loader_is_broken = False

    def loading(path: Path) -> CompiledPolicy:
        if loader_is_broken:
            raise RuntimeError("a bug in the loader")
        return load_policy(path)

    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    log = logging.getLogger("meshtoll.policy")
    holder = Watched(path, loading, log=log, fingerprint=file_fingerprint, describe=str)
    task = asyncio.create_task(holder.watch(POLL))
    try:
        loader_is_broken = True
        write(path, version("acme globex"))
        await eventually_async(
            lambda: holder.rejected_versions == 1, timeout=5, message="the bad version was never rejected"
        )
        loader_is_broken = False
        write(path, version("initech"))
        await eventually_async(
            lambda: set(holder.current.tenants) == {"initech"},
            timeout=5,
            message="the version with initech never became active",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [failure] = [record for record in caplog.records if record.levelname == "ERROR"]
    assert str(path) in failure.getMessage()
    assert failure.exc_info is not None


async def test_a_failing_listener_neither_undoes_the_swap_nor_silences_the_others(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    heard: list[int] = []

    def failing(policy: CompiledPolicy) -> None:
        raise RuntimeError("listener bug")

    async with watching(path) as holder:
        holder.on_change(failing)
        holder.on_change(lambda policy: heard.append(len(policy.tenants)))
        write(path, version("acme globex"))
        await eventually_async(
            lambda: heard == [2], timeout=5, message="the working listener did not hear versions [2]"
        )
        write(path, version("initech"))
        await eventually_async(
            lambda: heard == [2, 1], timeout=5, message="the working listener did not hear versions [2, 1]"
        )
        assert holder.version == 3


async def test_rejected_reloads_are_a_prometheus_counter(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        metrics = Metrics()
        export_policy(metrics, holder)
        write(path, "~: 1\n")
        await eventually_async(
            lambda: holder.rejected_versions == 1, timeout=5, message="the bad version was never rejected"
        )
        text = metrics.prometheus_text()
    # In the Prometheus text format the TYPE line names the samples' family, `_total` included.
    assert "# TYPE meshtoll_policy_rejected_reloads_total counter" in text
    assert "meshtoll_policy_rejected_reloads_total 1.0" in text


async def test_a_version_wrong_in_every_entry_logs_its_first_problems_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        write(path, "plans: {free: {}}\ntenants:\n" + "".join(f"  t{n}: {{plan: gold}}\n" for n in range(80)))
        await eventually_async(
            lambda: holder.rejected_versions == 1, timeout=5, message="the bad version was never rejected"
        )
    [record] = [record for record in caplog.records if record.levelname == "ERROR"]
    lines = record.getMessage().splitlines()
    assert len(lines) == 1 + LOGGED_PROBLEMS + 1
    assert lines[-1] == f"... and {80 - LOGGED_PROBLEMS} more problems"
