"""Hot reload: new versions swap in whole, bad versions never replace the last good one."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshtoll.policy.reload import PolicyHolder, watch_policy

POLL = 0.02


def version(tenants: str) -> str:
    names = "".join(f"  {name}: {{plan: free}}\n" for name in tenants.split())
    return f"plans: {{free: {{}}}}\ntenants:\n{names}"


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[PolicyHolder]:
    holder = PolicyHolder.from_file(path)
    task = asyncio.create_task(watch_policy(holder, POLL))
    try:
        yield holder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(POLL)


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
        await until(lambda: "globex" in holder.current.tenants)
        assert holder.version == 2
        # A decision that took the old object keeps a consistent view of it.
        assert set(first.tenants) == {"acme"}


async def test_an_invalid_version_is_rejected_and_the_last_good_one_stays(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        write(path, "plans: {free: {}}\ntenants: {acme: {plan: gold}}\n")
        await until(lambda: holder.rejected_versions == 1)
        assert set(holder.current.tenants) == {"acme"}
        assert holder.version == 1
        write(path, version("globex"))
        await until(lambda: "globex" in holder.current.tenants)


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
        await until(lambda: "initech" in holder.current.tenants)


async def test_a_vanished_file_keeps_the_policy_until_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    async with watching(path) as holder:
        path.unlink()
        await asyncio.sleep(POLL * 5)
        assert set(holder.current.tenants) == {"acme"}
        write(path, version("globex"))
        await until(lambda: "globex" in holder.current.tenants)


@pytest.mark.parametrize("listeners", [1, 2])
async def test_listeners_hear_each_accepted_version(tmp_path: Path, listeners: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(version("acme"))
    heard: list[int] = []
    async with watching(path) as holder:
        for _ in range(listeners):
            holder.on_change(lambda policy: heard.append(len(policy.tenants)))
        write(path, version("acme globex"))
        await until(lambda: len(heard) == listeners)
        assert heard == [2] * listeners
