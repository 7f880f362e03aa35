#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets (fuzz/corpus/<target>/seed-*).

Small, hand-made inputs of each boundary's format, so that libFuzzer starts from valid
shapes: policy files, protobuf messages, JSON, BTF blobs, ring-buffer records, audit logs
and exports. Run from the repository root: `python3 fuzz/make_seeds.py`. The audit
target's `seed-database` (mode byte 0, then a four-record log written by gatekeep-audit's
`AuditStore`) is not made here: it is kept as committed.
"""

import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


# --- policy_toml -------------------------------------------------------------------------
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
examples = os.path.join(repo, "gatekeep-policy", "examples")
for name in sorted(os.listdir(examples)):
    if name.endswith(".toml"):
        with open(os.path.join(examples, name), "rb") as f:
            put("policy_toml", name, f.read())
put("policy_toml", "commands.toml", """
[[policy]]
name = "cmds"
cgroups = ["/sys/fs/cgroup/agents/*", "/sys/fs/cgroup/**/ci-{a,b}?"]
mode = "audit"
[policy.exec]
default = "ask"
allow = ["/usr/bin/ls"]
multicall = ["/bin/busybox"]
bound_env = ["PYTHONPATH"]
[[policy.exec.command]]
argv = ["/usr/bin/kubectl", "delete", "**"]
action = "ask"
[[policy.exec.command]]
argv = ["/usr/bin/git", "**", "push", "**", "--force*", "**"]
action = "deny"
[[policy.exec.command]]
argv = ["/bin/busybox", "wget", "\\\\*x?"]
action = "deny"
[policy.connect]
default = "deny"
allow = ["10.0.0.0/8", "[2001:db8::]/32:443", "api.github.com:443", "*.example.com"]
deny = ["10.1.0.0/16:8000-8999"]
unix = "allow"
[policy.approval]
timeout = "1h 30m"
on_timeout = "allow"
grant_durations = ["once", "1h", "session", "always"]
[policy.protect]
relax = ["mount"]
""")
put("policy_toml", "errors.toml", """
[[policy]]
name = "x"
cgroups = ["agents/*"]
[policy.exec]
default = "alow"
[policy.connect]
allow = ["10.1.2.3/16", "[::1/128", "10.0.0.0/8:0-80"]
""")
put("policy_toml", "cases.toml", """
[[case]]
cgroup = "/sys/fs/cgroup/agents/a"
exec = "/usr/bin/kubectl"
argv = ["kubectl", "delete", "pod"]
expect = "ask"
[[case]]
cgroup = "/sys/fs/cgroup/agents/a"
connect = "10.1.2.3:443"
expect = "allow"
""")

# --- canonical_json ----------------------------------------------------------------------
for i, value in enumerate([
    {"argv": ["curl", "example.org"], "pid": 42},
    {"b": [1, -0.0, 1.5e300, 2.2250738585072014e-308, 18446744073709551615, -9223372036854775808],
     "a": {"é": "\u0000\u001f\"\\/\u2028", "": None, "z": True}},
    [[], {}, "", "🦀", 0.1, 1e-7, 123456789012345680000.0],
]):
    put("canonical_json", f"{i}.json", json.dumps(value, ensure_ascii=(i == 1)))

# --- proto_wire --------------------------------------------------------------------------


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    if isinstance(value, bool):
        return varint(num << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields):
    return b"".join(field(n, v) for n, v in fields)


exec_target = msg((1, "/usr/bin/kubectl"), (2, "kubectl"), (2, "delete"), (2, "pod"),
                  (3, "sha256:" + "ab" * 16), (4, 1), (5, "/usr/local/bin/kubectl"),
                  (8, False), (9, "LD_PRELOAD=/x.so"))
connect_target = msg((1, 1), (2, "10.1.2.3"), (3, 443), (4, 1), (5, "api.github.com"))
process = msg((1, 42), (2, "bash"), (3, "/bin/bash"), (4, "bash"), (4, "-c"), (5, "/agents/a"))
settings = msg((1, "sre"), (2, 1), (3, "once"), (3, "1h"), (4, "alice"))
request_id = "0190a5b4-8c3e-7000-8000-000000000001"
request = msg((1, request_id), (2, 1), (3, "ai-agents"), (4, "exec ask /usr/bin/kubectl"),
              (5, "/agents/a"), (6, 42), (7, 42), (8, 1000), (9, "alice"), (10, "/home/alice"),
              (11, process), (12, exec_target), (14, 1_790_000_000_000),
              (15, 1_790_000_300_000), (16, 2), (17, settings))
grant = msg((1, "0190a5b4-8c3e-7000-8000-000000000002"), (2, "web-1"), (3, "ai-agents"), (4, 2),
            (6, connect_target), (7, 1), (8, "1h"), (9, "/agents/a"), (10, 1_790_003_600_000),
            (11, "bob"), (12, 1_790_000_000_000), (13, request_id), (17, "cgroup"))
decision = msg((1, request_id), (2, 2), (3, 1), (4, "bob"), (5, "looks fine"),
               (6, 1_790_000_100_000), (7, "1h"), (8, grant))
vote = msg((1, "bob"), (2, "ok"), (3, "once"), (4, 1_790_000_100_000), (5, "cgroup"))
record = msg((1, request), (2, "web-1"), (3, 2), (4, 1_790_000_000_000), (5, 1_790_000_300_000),
             (6, vote), (7, 1), (8, decision))
for index, (name, data) in enumerate([
    ("exec_target", exec_target), ("connect_target", connect_target), ("process", process),
    ("approval_settings", settings), ("approval_request", request), ("grant", grant),
    ("decision", decision), ("vote", vote), ("request_record", record),
]):
    put("proto_wire", name, bytes([index]) + data)

# --- btf ---------------------------------------------------------------------------------
BTF_INT, BTF_PTR, BTF_ARRAY, BTF_STRUCT, BTF_UNION, BTF_TYPEDEF, BTF_CONST = 1, 2, 3, 4, 5, 8, 10


class Btf:
    def __init__(self):
        self.types = b""
        self.strings = b"\0"
        self.next = 1

    def s(self, text):
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind, name, vlen, size_or_type, extra=b"", kflag=0):
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.next += 1
        return self.next - 1

    def int(self, name, size):
        return self.add(BTF_INT, name, 0, size, struct.pack("<I", size * 8))

    def struct(self, name, size, members, kind=BTF_STRUCT):
        extra = b"".join(struct.pack("<III", self.s(m), t, off * 8) for m, t, off in members)
        return self.add(kind, name, len(members), size, extra)

    def blob(self):
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + self.types + self.strings


b = Btf()
u32 = b.int("unsigned int", 4)
u64 = b.int("long long unsigned int", 8)
kuid = b.struct("kuid_t", 4, [("val", u32, 0)])
cred = b.struct("cred", 16, [("usage", u32, 0), ("uid", kuid, 4), ("gid", kuid, 8)])
pcred = b.add(BTF_PTR, "", 0, cred)
ccred = b.add(BTF_CONST, "", 0, pcred)
arr = b.add(BTF_ARRAY, "", 0, 0, struct.pack("<III", u32, u32, 16))
task = b.struct("task_struct", 64, [("pid", u32, 0), ("tgid", u32, 4), ("cred", ccred, 8),
                                    ("comm", arr, 16), ("start_time", u64, 32)])
b.add(BTF_TYPEDEF, "pid_t", 0, u32)
b.struct("u", 8, [("a", u32, 0), ("b", u64, 0)], kind=BTF_UNION)
put("btf", "small", b.blob())
put("btf", "empty", Btf().blob())
# Truncated: header claims more than there is.
put("btf", "truncated", b.blob()[:40])

# --- ring_buffer_event: headers of each kind, zero bodies of a few sizes ------------------
for kind in range(0, 24):
    for size in (64, 256, 1024):
        put("ring_buffer_event", f"kind{kind}-{size}", struct.pack("<I", kind) + bytes(size - 4))

# --- audit_verify: an export and edit scripts (mode byte first) ---------------------------
put("audit_verify", "export", b"\x01" + (
    '{"seq":1,"at":"2026-11-24T21:42:56.123456789Z","kind":"requested","request_id":"r-1",'
    '"host":"web-1","actor":null,"payload":{"argv":["curl","example.org"],"pid":42},'
    '"prev_hash":"' + "0" * 64 + '","hash":'
    '"cb4085752a4836720dac1a2cbff421ebbea6c721d063ca1f91154861f42fd518"}\n').encode())
put("audit_verify", "edit-sql", b"\x02\xff" + bytes([1, 6, 2, ord("{"), ord("}"), 32]))
put("audit_verify", "edit-bytes", b"\x02" + bytes([0x10, 0x00, 0x41, 0x00, 0x20, 0x00]))
put("audit_verify", "pristine", b"\x02")

# --- slack_interaction: TIMESTAMP\nSIGNATURE\nBODY, signed with the target's secret ---------
import hashlib
import hmac
import urllib.parse

SLACK_SECRET = b"fuzz-signing-secret"


def slack(name, timestamp, payload, sign=True):
    body = b"payload=" + urllib.parse.quote(json.dumps(payload)).encode() if payload is not None else b"token=x"
    mac = hmac.new(SLACK_SECRET, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    signature = "v0=" + (mac if sign else "0" * 64)
    put("slack_interaction", name, timestamp.encode() + b"\n" + signature.encode() + b"\n" + body)


button = {
    "type": "block_actions",
    "user": {"id": "U0ALICE", "team_id": "T0TEAM"},
    "team": {"id": "T0TEAM"},
    "channel": {"id": "C0AGENTS"},
    "actions": [{"action_id": "gatekeep_approve", "value": "b1ec35ee-0000-4000-8000-000000000001"}],
    "state": {"values": {"gatekeep_actions": {"gatekeep_duration": {"selected_option": {"value": "1h"}}}}},
}
slack("approve", "1800000000", button)
slack("deny", "1800000000", dict(button, actions=[{"action_id": "gatekeep_deny", "value": "x"}]))
slack("other-type", "1800000000", {"type": "view_submission", "user": {"id": "U1"}})
slack("no-payload", "1800000000", None)
slack("stale", "1531420618", button)
slack("unsigned", "1800000000", button, sign=False)
slack("minimum", "-9223372036854775808", button)

# --- http_api: FLAGS PATH\nBODY (flags: method in bits 0-2, credentials in bits 3-4) ------
GET, POST, DELETE, PUT = 0, 1, 2, 3
NOBODY, REVIEWER, BAD_TOKEN, BAD_SESSION = 0, 1 << 3, 2 << 3, 3 << 3
ID = "b1ec35ee-0000-4000-8000-000000000001"


def http(name, flags, path, body=b""):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    put("http_api", name, bytes([flags]) + path.encode() + b"\n" + body)


http("openapi", GET | NOBODY, "/api/v1/openapi.json")
http("auth-methods", GET | NOBODY, "/api/v1/auth")
http("status", GET | REVIEWER, "/api/v1/status")
http("list-filtered", GET | REVIEWER, "/api/v1/requests?kind=exec&host=web-1&policy=ci&limit=5")
http("list-unknown-field", GET | REVIEWER, "/api/v1/requests?colour=red")
http("list-no-credentials", GET | NOBODY, "/api/v1/requests")
http("get-by-prefix", GET | REVIEWER, "/api/v1/requests/b1ec35ee0000")
http("resolve", GET | REVIEWER, "/api/v1/resolve/b1ec")
http("approve", POST | REVIEWER, f"/api/v1/requests/{ID}/decision",
     {"verdict": "allow", "reason": "checked the diff", "duration": "1h", "scope": "policy"})
http("deny", POST | REVIEWER, f"/api/v1/requests/{ID}/decision", {"verdict": "deny"})
http("decide-bad-token", POST | BAD_TOKEN, f"/api/v1/requests/{ID}/decision", {"verdict": "allow"})
http("decide-bad-session", POST | BAD_SESSION, f"/api/v1/requests/{ID}/decision", {"verdict": "allow"})
http("decide-not-json", POST | REVIEWER, f"/api/v1/requests/{ID}/decision", b"verdict=allow")
http("cancel", POST | REVIEWER, f"/api/v1/requests/{ID}/cancel", {"reason": "no longer needed"})
http("grants", GET | REVIEWER, "/api/v1/grants?host=web-1&include_inactive=true")
http("revoke", POST | REVIEWER, f"/api/v1/grants/{ID}/revoke", {"reason": "rotated"})
http("sign-in", POST | NOBODY, "/api/v1/session", {"token": "gk_not-a-token"})
http("session", GET | BAD_SESSION, "/api/v1/session")
http("sign-out", DELETE | BAD_SESSION, "/api/v1/session")
http("device-token", POST | BAD_SESSION, "/api/v1/token", {"id_token": "eyJhbGciOiJub25lIn0.e30."})
http("events", GET | REVIEWER, "/api/v1/events")
http("verify", GET | REVIEWER, "/api/v1/audit/verify")
http("export", GET | REVIEWER, "/api/v1/audit/export?from_seq=2")
http("unknown-route", PUT | REVIEWER, "/api/v1/nothing/here")
http("console", GET | NOBODY, "/console/")
http("oidc-login", GET | NOBODY, "/auth/oidc/login?max_age=0&return_to=%23%2Frequests")
http("oidc-callback", GET | NOBODY, "/auth/oidc/callback?code=x&state=y")
