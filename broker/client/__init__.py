"""The library an agent (or a tool server) imports to talk to the local broker daemon.

* :class:`Client` / :class:`AsyncClient`: ``token(tool, audience)`` returns a cached token and refreshes
  it before it expires (concurrent callers share one refresh); ``mint``, ``verify``, ``jwks``,
  ``revoke``, ``describe`` and ``watch`` map one-to-one to the daemon's RPCs.
* :class:`TokenVerifier`: for tool servers, verifies tokens offline against keys and revocations it keeps
  fresh from the daemon's stream.

Errors are typed (see :mod:`broker.errors`): :class:`~broker.errors.Unavailable` (retried a few times
with backoff before it is raised), :class:`~broker.errors.PermissionDenied`,
:class:`~broker.errors.InvalidToken`, :class:`~broker.errors.RequestRejected` for anything else.
"""

from broker.client._async import AsyncClient
from broker.client._cache import Minted
from broker.client._socket import resolve_socket
from broker.client._sync import Client
from broker.client._verifier import TokenVerifier

__all__ = ["AsyncClient", "Client", "Minted", "TokenVerifier", "resolve_socket"]
