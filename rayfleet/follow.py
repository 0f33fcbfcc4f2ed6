"""What `rayfleet run` does each second once its deployments run: follow FILE.yaml and show the deployments.

The file is followed as users expect of running `kubectl apply -f FILE.yaml` on each save: a changed file
is validated again and each of its deployments PUT again (a new version rolls out), an invalid edit is
shown and leaves what runs alone, and a deployment gone from the file is deleted. A status line is
printed when a deployment's readiness changes, and a rollout line when a rollout starts, advances (the
canary's weight), completes or fails (and what it rolled back to), from the controller's ``rollout``.
No Ray here: ``local_run`` starts it and hands over a controller client.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from rayfleet.manifest import Manifest, load_manifests
from rayfleet_api.controller_client import ControllerClient, ControllerRejected, ControllerUnreachable
from rayfleet_api.errors import SpecError


class WatchedFile:
    """Tells whether a file's contents changed since it last said so. The stat is read every time, the
    contents only when the stat moved: saving unchanged text (or a `touch`) is no change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._digest: bytes | None = None

    def changed(self) -> bool:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return False
            digest = hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:  # an editor saving by rename leaves it missing a moment: wait for the new one
            return False
        self._stamp = stamp
        if digest == self._digest:
            return False
        self._digest = digest
        return True

    def forget(self) -> None:
        """Make the next look a change: what was read could not be applied and is to be tried again."""
        self._stamp = self._digest = None


def endpoint_line(manifest: Manifest, host: str, port: int) -> str:
    return f"rayfleet: {manifest.name} -> http://{host}:{port}{manifest.desired_state().route_prefix}"


def status_line(obs: dict[str, Any]) -> str:
    line = f"{obs['name']}: {obs['readyReplicas']}/{obs['targetReplicas']} ready ({obs['status']})"
    scaling = obs.get("autoscaling")
    if scaling is not None:
        load = scaling.get("load")
        line += f", autoscaling {obs['desiredReplicas']}" + ("" if load is None else f" (load {round(load, 1):g})")
    if obs.get("error"):
        line += f" - {obs['error']['reason']}: {obs['error']['message']}"
    if obs.get("restarts"):
        line += f", {obs['restarts']} restarts"
    waiting = [r for r in obs.get("replicas") or [] if r.get("unschedulable")]
    if waiting:
        line += f" - {len(waiting)} replica(s) {waiting[0]['unschedulable']}"
    return line


def rollout_line(name: str, rollout: dict[str, Any], started: bool) -> str:
    """One rollout's news: ``started`` when its revision is new to this terminal."""
    revision = f"revision {rollout['revision']} ({rollout.get('version', '')})"
    weight = rollout.get("canaryWeight")
    if rollout["state"] == "Failed":  # the controller's message names the revision, the reason and the rollback
        back = rollout.get("rolledBackTo")
        words = f"{revision}: {rollout.get('reason')}" + (f"; rolled back to revision {back}" if back else "")
        return f"{name}: rollout failed: {rollout.get('message') or words}"
    if rollout["state"] == "Complete":
        return f"{name}: {revision} rolled out"
    if weight is None:
        return f"{name}: rolling out {revision}"
    return f"{name}: {'canary of ' + revision if started else 'canary'} at {weight}% of requests"


class Follower:
    """The loop's state: the deployments the file holds, and what was last printed for each."""

    def __init__(self, api: ControllerClient, file: WatchedFile, field_validation: str, manifests: list[Manifest],
                 host: str, port: int):
        self.api, self.file, self.field_validation = api, file, field_validation
        self.host, self.port = host, port
        self.names = [m.name for m in manifests]
        self._status: dict[str, str] = {}
        self._rollout: dict[str, tuple[int, str, int | None]] = {}

    def turn(self) -> None:
        """One look at the file, then one at the controller."""
        try:
            self.apply_if_changed()
            self.show(self.api.list_deployments())
        except ControllerUnreachable as exc:
            print(f"rayfleet: controller not answering: {exc}", file=sys.stderr, flush=True)

    def apply_if_changed(self) -> None:
        if not self.file.changed():
            return
        warnings: list[str] = []
        try:
            manifests = load_manifests(self.file.path, self.field_validation, warnings)
        except (SpecError, OSError) as exc:
            print(f"rayfleet run: {exc}; still running the last valid {self.file.path}", file=sys.stderr, flush=True)
            return
        for warning in warnings:
            print(f"Warning: {warning}", file=sys.stderr, flush=True)
        try:
            self._apply(manifests)
        except ControllerUnreachable:
            self.file.forget()  # applied next turn, once the controller answers
            raise

    def _apply(self, manifests: list[Manifest]) -> None:
        print(f"rayfleet: {self.file.path} changed: applying it", flush=True)
        for m in manifests:
            try:
                self.api.put_deployment(m.name, m.desired_state())
            except ControllerRejected as exc:  # the others still apply, as kubectl apply does
                print(f"rayfleet run: {m.name}: {exc}", file=sys.stderr, flush=True)
                continue
            if m.name not in self.names:
                self.names.append(m.name)
                print(endpoint_line(m, self.host, self.port), flush=True)
        kept = {m.name for m in manifests}
        for name in [n for n in self.names if n not in kept]:
            print(f"rayfleet: {name} is no longer in {self.file.path}: deleting it", flush=True)
            self.api.delete_deployment(name)
            self.names.remove(name)

    def show(self, observed: list[dict[str, Any]]) -> None:
        for obs in observed:
            for line in (self._rollout_news(obs), self._status_news(obs)):
                if line is not None:
                    print(line, flush=True)

    def _status_news(self, obs: dict[str, Any]) -> str | None:
        line = status_line(obs)
        if self._status.get(obs["name"]) == line:
            return None
        self._status[obs["name"]] = line
        return line

    def _rollout_news(self, obs: dict[str, Any]) -> str | None:
        rollout = obs.get("rollout")
        if not rollout:
            return None
        key = (rollout["revision"], rollout["state"], rollout.get("canaryWeight"))
        before = self._rollout.get(obs["name"])
        if before == key:
            return None
        self._rollout[obs["name"]] = key
        return rollout_line(obs["name"], rollout, started=before is None or before[0] != key[0])

