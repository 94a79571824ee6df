"""Policy: which attested caller may mint what. Pure decisions, no I/O beyond attestation lookups.

Every refusal raises :class:`~broker.errors.PermissionDenied` whose ``reason`` is precise (for the
audit log) while the caller sees a generic message, unless it already matched the workflow: then its own
mistake (a tool the workflow lacks, a ttl above the tool's) is ``caller_may_know`` and said to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.attest import Caller, matches
from broker.config import Config, Tool, Workflow
from broker.errors import PermissionDenied


@dataclass(frozen=True, slots=True)
class Grant:
    """A decision to mint: for this workflow and tool (None for a workflow-level SVID), this long."""

    workflow: Workflow
    tool: Tool | None
    ttl: int


def caller_matches(workflow: Workflow, caller: Caller) -> bool:
    return any(matches(rule, caller) for rule in workflow.callers)


def authorize_mint(config: Config, caller: Caller, workflow: str, tool: str, ttl: int) -> Grant:
    """Decide a MintToken request. ``ttl`` 0 means the tool's own ttl."""
    wf = config.workflows.get(workflow)
    if wf is None:
        raise PermissionDenied(f"unknown workflow {workflow!r}")
    # Check the caller before the tool: an unattested caller learns nothing about which tools exist.
    if not caller_matches(wf, caller):
        raise PermissionDenied(f"caller does not match any caller block of workflow {workflow!r}")
    t = wf.tools.get(tool)
    if t is None:
        raise PermissionDenied(f"tool {tool!r} is not granted to workflow {workflow!r}", caller_may_know=True)
    if ttl < 0 or ttl > t.ttl:
        raise PermissionDenied(f"ttl {ttl}s exceeds the tool's ttl {t.ttl}s", caller_may_know=True)
    return Grant(wf, t, ttl or t.ttl)


def svid_workflows(config: Config, caller: Caller, spiffe_id: str) -> list[Workflow]:
    """Workflows whose identity the caller may hold (SPIFFE FetchJWTSVID), optionally one by id."""
    prefix = f"spiffe://{config.broker.trust_domain}/workflow/"
    found = [wf for wf in config.workflows.values() if caller_matches(wf, caller)]
    if spiffe_id:
        found = [wf for wf in found if prefix + wf.name == spiffe_id]
    if not found:
        raise PermissionDenied(
            f"caller matches no workflow{' with id ' + repr(spiffe_id) if spiffe_id else ''}")
    return found
