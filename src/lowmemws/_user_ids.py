"""User ids: an application's int or str user id and the 64-bit tag its connections carry in C.

Theory of operation. The C slot of a connection has one 64-bit user tag and nothing else, so
a user id must become a 64-bit number that costs nothing to keep, and come back from it when
a hook asks ``conn.user``. The tag space is split in two halves, so an int id and a str id
never meet:

- an int id is its own tag and must lie in 0..2**63-1 (0: no user);
- a str id's tag has the top bit set (2**63..2**64-1). A short id is *encoded* in the tag,
  reversibly: up to 9 characters of ``[0-9A-Za-z_-]``, or else up to 7 bytes of UTF-8. The
  encoding is scrambled by a keyed permutation (a 4-round Feistel network over 60 bits whose
  round function is keyed BLAKE2b), so tags look random in the hub's user buckets and a
  client cannot pick names that pile up in one. Any longer id (up to `USER_NAME_MAX` bytes of
  UTF-8) is a keyed BLAKE2b hash of its UTF-8 (62 bits); its tag cannot be turned back into
  the name, so each process keeps the names of the long ids online there in C, one entry per
  user (``_user_names.c``), and `Connection.user` reads it there. Where no connection of the
  user is (a tag given to ``send_to_user`` only), `UserTag` stands for it.

Every node and process of a deployment must use the same key, or a ``send_to_user("alice")``
on one node would look for another tag than the ``Accept(user="alice")`` of another. Forked
worker processes inherit their gateway's key; nodes sharing a redis-server derive it from the
bus's ``channel_prefix`` and the optional ``user_key`` secret they are all given
(`deployment_key`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ._native import lib

__all__ = [
    "UserId",
    "UserIds",
    "UserTag",
    "deployment_key",
    "INT_USER_MAX",
    "USER_NAME_MAX",
    "check_str_user",
    "is_long_tag",
]

#: INT_USER_MAX is the largest int user id (the upper half of the tag space is for str ids).
INT_USER_MAX = 2**63 - 1
#: USER_NAME_MAX is the most bytes of UTF-8 a str user id may have.
USER_NAME_MAX = int(lib.LMW_USER_NAME_MAX)
_STR_BIT = 1 << 63
_INLINE_BIT = 1 << 62
_HASH_MASK = _INLINE_BIT - 1
_HALF_BITS = 30  # the Feistel network permutes 60 bits as two halves of 30
_HALF_MASK = (1 << _HALF_BITS) - 1
_ROUNDS = 4
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-"  # 6 bits each
_ALPHABET_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_ALPHABET_MAX = 9  # 4 bits of length + 9 x 6 bits = 58 bits
_BYTES_MAX = 7  # 3 bits of length + 7 x 8 bits = 59 bits
_MODE_ALPHABET = 1 << 59  # inside the 60-bit block: which of the two encodings
_KEY_PERSON = b"lmw-user-ids"
_CACHE = 256  # ids and names remembered each way: a fixed ~40 KB at most, never per connection


@dataclass(frozen=True, slots=True)
class UserTag:
    """UserTag stands for a str user id that is too long to be kept in its connection's tag
    (longer than 9 characters of ``[0-9A-Za-z_-]`` and 7 bytes of UTF-8) where its name is
    not known.

    ``Connection.user`` gives the str in every hook, read from the process's table of the
    long ids online there; a UserTag only when that name is gone (a handle kept after its
    connection and its user's last connection in the process closed). It reaches the same
    connections as the str: ``send_to_user(tag, ...)``, ``online(tag)`` and
    ``disconnect_user(tag)`` accept it.
    """

    tag: int
    """tag is the 64-bit number the user's connections carry (2**63..2**64-1)."""

    def __repr__(self) -> str:
        return f"UserTag({self.tag:#018x})"


UserId = int | str | UserTag
"""UserId is what names a user: an int in 0..2**63-1, a non-empty str, or a UserTag."""


def is_long_tag(tag: int) -> bool:
    """is_long_tag tells whether tag is a long str id's (a hash: the name is not in it)."""
    return tag >> 62 == 2


def check_str_user(user: str) -> bytes:
    """check_str_user is a str user id's UTF-8, once it is known to be valid.

    Raises:
        ValueError: an empty str, or one over USER_NAME_MAX bytes of UTF-8.
    """
    if not user:
        raise ValueError("a str user id must not be empty")
    raw = user.encode("utf-8")
    if len(raw) > USER_NAME_MAX:
        raise ValueError(f"a str user id is at most {USER_NAME_MAX} bytes of UTF-8, not {len(raw)}")
    return raw


def deployment_key(channel_prefix: str, secret: bytes | str | None) -> bytes:
    """deployment_key is the user-id key every node and Publisher on one Redis deployment
    computes alike: BLAKE2b of the channel prefix, keyed by the shared secret if any.

    Without a secret the key is public (anyone who knows the prefix can compute tags), which
    only matters against clients that choose their own names to crowd one hub bucket: pass
    the same ``user_key`` secret to every RedisBus and Publisher of the deployment to rule
    that out.
    """
    raw = secret.encode() if isinstance(secret, str) else (secret or b"")
    digest = hashlib.blake2b(
        channel_prefix.encode(), digest_size=16, key=raw[:64], person=_KEY_PERSON
    )
    return digest.digest()


class UserIds:
    """UserIds maps user ids to tags and back, with one key (random unless given).

    The last few thousand str ids are remembered both ways (a busy user costs the keyed
    permutation once, not per message); a full cache is emptied, as TopicIds does.
    Thread-safe: the caches are plain dicts, each operation atomic under the GIL.
    """

    __slots__ = ("key", "_tags", "_names")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else os.urandom(16)
        self._tags: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def tag(self, user: object) -> int:
        """tag is the 64-bit tag of user (an int keeps its own value; 0 is "no user").

        Raises:
            ValueError: an int outside 0..2**63-1, an empty str or one over USER_NAME_MAX
                bytes of UTF-8.
            TypeError: anything but an int, a str or a UserTag.
        """
        if isinstance(user, str):
            known = self._tags.get(user)
            if known is not None:
                return known
            raw = check_str_user(user)
            tag = self._str_tag(user, raw)
            _remember(self._tags, user, tag)
            return tag
        if isinstance(user, UserTag):
            if not _STR_BIT <= user.tag < 2**64:
                raise ValueError("a UserTag's tag lies in 2**63..2**64-1")
            return user.tag
        if isinstance(user, int) and not isinstance(user, bool):
            if not 0 <= user <= INT_USER_MAX:
                raise ValueError(
                    f"an int user id lies in 0..2**63-1 (the upper half is for str ids), not {user}"
                )
            return user
        raise TypeError(f"a user id is an int or a str, not {type(user).__name__}")

    def user(self, tag: int) -> int | str | UserTag:
        """user is the id a tag stands for: the int, the str when it is encoded in the tag,
        else a UserTag."""
        if tag < _STR_BIT:
            return tag
        if not tag & _INLINE_BIT:
            return UserTag(tag)
        known = self._names.get(tag)
        if known is not None:
            return known
        name = _decode(self._unpermute(tag & ((1 << 2 * _HALF_BITS) - 1)))
        if name is None:
            return UserTag(tag)
        _remember(self._names, tag, name)
        return name

    def _str_tag(self, user: str, raw: bytes) -> int:
        inline = _encode(user)
        if inline is None:
            digest = hashlib.blake2b(raw, digest_size=8, key=self.key)
            return _STR_BIT | int.from_bytes(digest.digest(), "little") & _HASH_MASK
        return _STR_BIT | _INLINE_BIT | self._permute(inline)

    # -- the keyed permutation of the 60-bit block ------------------------------------------

    def _round(self, index: int, half: int) -> int:
        data = half.to_bytes(4, "little") + bytes((index,))
        digest = hashlib.blake2b(data, digest_size=4, key=self.key).digest()
        return int.from_bytes(digest, "little") & _HALF_MASK

    def _permute(self, block: int) -> int:
        left, right = block >> _HALF_BITS, block & _HALF_MASK
        for index in range(_ROUNDS):
            left, right = right, left ^ self._round(index, right)
        return left << _HALF_BITS | right

    def _unpermute(self, block: int) -> int:
        left, right = block >> _HALF_BITS, block & _HALF_MASK
        for index in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(index, left), left
        return left << _HALF_BITS | right


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE:
        cache.clear()
    cache[key] = value


def _encode(name: str) -> int | None:
    """_encode is name as a 60-bit block, or None when it does not fit."""
    if len(name) <= _ALPHABET_MAX and all(c in _ALPHABET_INDEX for c in name):
        block = len(name)
        for c in name:
            block = block << 6 | _ALPHABET_INDEX[c]
        return _MODE_ALPHABET | block << 6 * (_ALPHABET_MAX - len(name))
    raw = name.encode("utf-8")
    if len(raw) > _BYTES_MAX:
        return None
    return len(raw) << 8 * _BYTES_MAX | int.from_bytes(raw.ljust(_BYTES_MAX, b"\0"), "big")


def _decode(block: int) -> str | None:
    """_decode reverses _encode; None for a block _encode never makes."""
    if block & _MODE_ALPHABET:
        block &= _MODE_ALPHABET - 1
        length = block >> 6 * _ALPHABET_MAX
        if length > _ALPHABET_MAX:
            return None
        chars = [(block >> 6 * (_ALPHABET_MAX - 1 - i)) & 63 for i in range(length)]
        return "".join(_ALPHABET[c] for c in chars)
    length = block >> 8 * _BYTES_MAX
    if length > _BYTES_MAX:
        return None
    raw = (block & ((1 << 8 * _BYTES_MAX) - 1)).to_bytes(_BYTES_MAX, "big")[:length]
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if _encode(name) == block else None
