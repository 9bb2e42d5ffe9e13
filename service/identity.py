"""Who is calling: one decision for HTTP, WebSocket and the Gradio UI.

A caller is, in this order:
- a key holder: a valid API key or admin key (a header, or the signed login cookie). The user is
  the key's owner id; admin keys make an admin.
- the machine's owner: a loopback client when loopback is trusted (not on a Space, not with
  --share). With no API keys it is the user "local"; with no admin keys it is an admin.
- a browser (Gradio UI only): a random id the server signed and the browser keeps; a forged or
  altered id is a new user, never someone else's.
- anonymous: anyone else. It may generate (OpenAI, TGI, WebSocket), but has no stored sessions
  and shares no cached prefix with anyone.

Rate limits count by the key's owner for a valid key, else by the peer's address: a header
carrying an invalid key changes nothing. Prefix-cache reuse is scoped to the user, or to an
explicit `cache_salt` group. Nothing here knows about HTTP frameworks; the server adapts it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass

LOCAL_USER = "local"
_COOKIE_DAYS = 30


@dataclass(frozen=True)
class Caller:
    user: str | None  # whose sessions and files; None: anonymous
    admin: bool  # may change the model pool
    rate_key: str  # whom rate limits count
    cache_scope: str | None  # whose cached prefixes may be reused; None: nobody's
    how: str  # "key", "local", "browser" or "anonymous" (for messages and logs)

    def with_cache_salt(self, salt: str | None) -> Caller:
        """An explicit salt: share cached prefixes with exactly the callers who send it (vLLM's rule)."""
        if not salt:
            return self
        digest = hashlib.sha256(salt.encode()).hexdigest()[:24]
        return Caller(self.user, self.admin, self.rate_key, f"salt-{digest}", self.how)


def key_owner(key: str) -> str:
    """A stable, non-secret id for the holder of a key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address((host or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode(errors="surrogatepass")).digest()  # JSON may carry lone surrogates


def _matches(key: str, digests: list[bytes]) -> bool:
    """Constant time: every digest is compared (no early exit on a match, no length to leak)."""
    candidate = _digest(key)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found


class Identity:
    def __init__(self, *, api_keys: list[str], admin_keys: list[str], secret: str, trust_loopback: bool):
        # Keys are compared as digests: equal lengths, so the time taken says nothing about a key's length.
        self._admin = [_digest(k) for k in admin_keys]
        self._keys = [_digest(k) for k in api_keys] + self._admin
        self._owners = {key_owner(k) for k in (*api_keys, *admin_keys)}
        self._admin_owners = {key_owner(k) for k in admin_keys}
        self._secret = hashlib.sha256(b"shoal-identity:" + secret.encode()).digest()
        self.keys_required = bool(api_keys)  # admin keys alone protect admin actions only
        self.admin_keys_on = bool(self._admin)
        self.trust_loopback = trust_loopback

    # ------------------------------------------------------------------ keys
    def key_is_valid(self, key: str | None) -> bool:
        if not key:
            return False
        return _matches(key, self._keys)

    def is_admin_key(self, key: str) -> bool:
        return _matches(key, self._admin)

    # ------------------------------------------------------------------ callers
    def caller(self, *, key: str | None, cookie: str | None, host: str | None) -> Caller:
        """The caller of an HTTP request or WebSocket: a valid key (header or signed cookie),
        else the trusted local owner, else anonymous."""
        owner = None
        if self.key_is_valid(key):
            owner = key_owner(key)
        elif cookie:
            owner = self.cookie_owner(cookie)
        local = self.trust_loopback and is_loopback(host)
        if owner is not None:
            admin = owner in self._admin_owners or (local and not self.admin_keys_on)
            return Caller(owner, admin, owner, owner, "key")
        rate = "ip-" + (host or "unknown")
        if local and not self.keys_required:
            return Caller(LOCAL_USER, not self.admin_keys_on, rate, LOCAL_USER, "local")
        return Caller(None, False, rate, None, "anonymous")

    def browser_caller(self, base: Caller, browser_token: str | None) -> Caller | None:
        """The UI's user: a key holder stays who the key says; otherwise the browser's signed id
        (None if the token is missing, forged or altered)."""
        if base.how == "key":
            return base
        browser = self.browser_id(browser_token)
        if browser is None:
            return None
        user = f"browser-{browser}"
        return Caller(user, base.admin, base.rate_key, user, "browser")

    # ------------------------------------------------------------------ signed browser ids
    def new_browser_token(self) -> str:
        ident = secrets.token_hex(16)
        return f"{ident}.{self._sign('browser', ident)}"

    def browser_id(self, token: str | None) -> str | None:
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        ident, signature = token.split(".")
        if len(ident) != 32 or not hmac.compare_digest(signature, self._sign("browser", ident)):
            return None
        return ident

    # ------------------------------------------------------------------ login cookie
    def login_cookie(self, key: str, now: float | None = None) -> str:
        """A cookie naming the key's owner, signed by the server: it never holds the key."""
        owner = key_owner(key)
        expires = int((now or time.time()) + _COOKIE_DAYS * 86400)
        return f"{owner}.{expires}.{self._sign('cookie', f'{owner}.{expires}')}"

    def cookie_owner(self, cookie: str, now: float | None = None) -> str | None:
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        owner, expires, signature = parts
        if not hmac.compare_digest(signature, self._sign("cookie", f"{owner}.{expires}")):
            return None
        if int(expires) < (now or time.time()) or owner not in self._owners:
            return None  # expired, or its key was removed from the configuration
        return owner

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:32]

    # ------------------------------------------------------------------ messages
    def admin_refusal(self) -> str:
        if self.admin_keys_on:
            return ("Changing the model pool needs an admin key: send it as 'Authorization: Bearer <key>'.")
        return ("Changing the model pool needs an admin key. Start Shoal with --admin-keys (env "
                "SHOAL_ADMIN_KEYS; on a Space, a secret) and send it as 'Authorization: Bearer <key>'. "
                "Without admin keys, only clients on this machine (127.0.0.1) may do this, and not on a "
                "Space or with --share.")

    def user_refusal(self) -> str:
        return ("Stored sessions and files need an API key on a shared address: start Shoal with --api-keys "
                "(env SHOAL_API_KEYS; on a Space, a secret) and send 'Authorization: Bearer <key>'. Without "
                "keys, only clients on this machine have REST sessions; the web UI keeps one per browser.")
