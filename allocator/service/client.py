"""``bitalloc.Client``: the service's verbs from Python (httpx underneath).

    import bitalloc
    c = bitalloc.Client("http://127.0.0.1:8750", token=None)
    job = c.profile(model="smollm2", measured=True)          # POST /v1/profiles -> job
    job = c.wait(job["id"])                                   # poll until done / failed / cancelled
    prof = job["result"]["profile_id"]
    plan = c.solve(prof, "3.5bpw", pins={"*.down_proj": "w8"})  # POST /v1/plans
    c.save_plan(plan["id"], "plan.json")                       # the same JSON `bitalloc solve` writes

Every non-2xx answer raises :class:`ServiceError` (a ``BitallocError``) carrying the HTTP
status and the field the server named.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bitalloc import BitallocError

__all__ = ["Client", "ServiceError"]


class ServiceError(BitallocError, ValueError):
    """The server refused a request (or could not be reached); ``status`` and ``field`` say why."""

    def __init__(self, msg: str, status: int | None = None, field: str | None = None, body: Any = None):
        super().__init__(msg)
        self.status, self.field, self.body = status, field, body


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8750", token: str | None = None, *, timeout: float = 120.0):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the bitalloc server at {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
                msg, field = body.get("error", r.text), body.get("field")
            except ValueError:
                body, msg, field = r.text, r.text[:200], None
            raise ServiceError(f"server answered {r.status_code}: {msg}", r.status_code, field, body)
        return r

    def _json(self, method: str, path: str, **kw) -> Any:
        return self._request(method, path, **kw).json()

    # -- verbs -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def profile(self, model: str = "smollm2", **fields) -> dict:
        """Submit a profiling job (fields as ``bitalloc profile``; ``calibration={"text": ...}`` for inline text)."""
        return self._json("POST", "/v1/profiles", json={"model": model, **fields})

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> dict:
        """Poll a job until it is done, failed or cancelled; returns the job (raises on timeout)."""
        t0 = time.monotonic()
        while True:
            job = self.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise ServiceError(f"job {job_id} still {job['state']} after {timeout:g}s")
            time.sleep(poll_s)

    def upload_profile(self, path: str | os.PathLike) -> dict:
        """Upload a profile JSON made by ``bitalloc profile`` (streamed from the file). A profile
        whose bulk arrays sit in a safetensors sidecar is read here (checked against the hash
        it records) and sent as one self-contained document with the arrays inline."""
        if self._refers_to_sidecar(path):
            from bitalloc.sensitivity.profile import SensitivityProfile

            body = SensitivityProfile.load(path).to_json_bytes()
            return self._json("POST", "/v1/profiles/upload", content=body, headers={"Content-Type": "application/json"})
        with open(path, "rb") as f:
            return self._json("POST", "/v1/profiles/upload", content=f,
                              headers={"Content-Type": "application/json"})

    @staticmethod
    def _refers_to_sidecar(path: str | os.PathLike) -> bool:
        from bitalloc.sensitivity.profile import sidecar_name

        p = Path(path)
        return p.with_name(sidecar_name(p)).is_file()

    def profiles(self) -> list[dict]:
        return self._json("GET", "/v1/profiles")["profiles"]

    def get_profile(self, profile_id: str) -> dict:
        return self._json("GET", f"/v1/profiles/{profile_id}")

    def frontier(self, profile_id: str, points: int = 20, *, png: bool = False, method: str = "dp"):
        r = self._request("GET", f"/v1/profiles/{profile_id}/frontier", params={"points": points, "method": method},
                          headers={"Accept": "image/png" if png else "application/json"})
        return r.content if png else r.json()

    def solve(self, profile_id: str, budget: str | float, **options) -> dict:
        """``POST /v1/plans``: the plan's id, layers, predicted sizes and losses (options as ``bitalloc solve``)."""
        return self._json("POST", "/v1/plans", json={"profile": profile_id, "budget": budget, **options})

    def plan(self, plan_id: str):
        """The stored plan as a :class:`bitalloc.Plan`."""
        from bitalloc.allocator.plan import Plan

        return Plan.from_dict(self._json("GET", f"/v1/plans/{plan_id}"), source=f"plan {plan_id}")

    def save_plan(self, plan_id: str, path: str | os.PathLike) -> Path:
        """Write the plan file exactly as the server stores it (the bytes of ``bitalloc solve``'s JSON)."""
        from bitalloc.sensitivity.artifact import write_bytes

        return write_bytes(path, self._request("GET", f"/v1/plans/{plan_id}").content)

    def export(self, plan_id: str, target: str, *, model: str | None = None, **options) -> dict:
        body = {"plan": plan_id, "target": target, "options": options}
        if model is not None:
            body["model"] = model
        return self._json("POST", "/v1/exports", json=body)

    def download(self, artifact_id: str, path: str | os.PathLike) -> Path:
        from bitalloc.sensitivity.artifact import atomic_write

        with self._http.stream("GET", f"/v1/artifacts/{artifact_id}") as r:
            if r.status_code >= 400:
                r.read()
                try:
                    msg = r.json().get("error")
                except ValueError:
                    msg = r.text[:200]
                raise ServiceError(f"server answered {r.status_code}: {msg}", r.status_code, "id")
            with atomic_write(path, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        return Path(path)
