"""Writes the seed corpora (fuzz/corpus/<target>/) from the test fixtures: run from fuzz/
(`python3 seeds.py`); the output is committed, so CI does not need Python."""
import gzip, json, os
root = "corpus"
NOW = 1_790_000_000_000
def ids(i): return f"0196a1b2-c3d4-7e5f-8a9b-{i:012x}"
def event(device, seq, i):
    return {"id": ids(i), "name": "button_clicked", "schema": "event/1", "ts": NOW - 1000,
            "source": "client", "anon_id": "anon-1", "session_id": "sess-1",
            "device_id": device, "seq": seq,
            "props": {"button": "checkout", "price": 49.5},
            "context": {"url": "https://shop.example/cart", "title": "Cart"}}
def server_event(name, i, props=None):
    return {"id": ids(i), "name": name, "schema": "event/1", "ts": NOW - 2000,
            "source": "server", "anon_id": "user-42", "user_id": "user-42",
            "props": props or {"order_id": "o-1"}}
def batch(events, **extra):
    b = {"v": 1, "site": "demo"}; b.update(extra); b["events"] = events
    return json.dumps(b, separators=(",", ":")).encode()
counters = {"device_id": "dev-c", "enqueued": 10, "sent": 9, "acked": 6, "retried": 1,
            "pending": 2, "dropped": {"queue_full": 2}}
attrib = dict(event("d1", 7, 50)); attrib["context"] = {"url": "https://shop.example/p",
    "referrer": "https://news.example/", "attribution": {"first": {"utm_source": "news", "utm_medium": "email", "ts": NOW - 86400000},
                                                      "last": {"gclid": "abc", "landing_page": "/p"}}, "degraded": "memory_queue"}
signup = dict(event("d1", 8, 51)); signup.update(name="signup_completed", schema="signup_completed/1", props={"plan": "pro", "seats": 3})
identify = dict(event("d1", 9, 52)); identify.update(name="identify", schema="identify/1", user_id="u-1", props={"traits": {"email": "a@b.example"}})
pv = dict(event("d1", 10, 53)); pv.update(name="page_view", schema="page_view/1", props={})
bad_id = dict(event("d1", 11, 54)); bad_id["id"] = "67e55044-10b1-426f-9247-bb680e5fe0c8"
wrong_source = server_event("order_paid", 55)
client_batches = {
    "one_event": batch([event("dev-1", 1, 1)]),
    "three_events": batch([event("dev-1", i, i) for i in range(1, 4)]),
    "with_counters": batch([event("dev-c", 1, 10)], counters=counters, sent_at=NOW),
    "schemas": batch([attrib, signup, identify, pv]),
    "mixed_rejects": batch([event("dev-1", 1, 20), bad_id, wrong_source, {"id": ids(21)}, 5, [1, [2]]]),
    "empty": batch([]),
    "no_site": json.dumps({"v": 1, "events": [event("d", 1, 30)]}).encode(),
    "v2": json.dumps({"v": 2, "site": "demo", "events": []}).encode(),
}
server_batches = {
    "order_paid": batch([server_event("order_paid", 60, {"order_id": "o-9", "amount": 49.5, "currency": "EUR"})]),
    "signup": batch([dict(server_event("signup_completed", 61), schema="signup_completed/1", props={"plan": "team", "seats": 5})]),
    "no_site": json.dumps({"v": 1, "events": [server_event("order_paid", 62)]}).encode(),
    "wrong_site": json.dumps({"v": 1, "site": "other", "events": [server_event("x", 63)]}).encode(),
    "client_event_on_server_path": batch([event("d", 1, 64)]),
}
def write(target, name, data):
    os.makedirs(f"{root}/{target}", exist_ok=True)
    open(f"{root}/{target}/{name}", "wb").write(data)
# Start afresh, but keep the regressions (regress-*: inputs a run found, kept by hand).
for d, _, files in os.walk(root):
    for f in files:
        if not f.startswith("regress-"): os.remove(os.path.join(d, f))
# batch: plain JSON
for k, v in client_batches.items(): write("batch", k + ".json", v)
for k, v in list(server_batches.items())[:2]: write("batch", "server_" + k + ".json", v)
# relay paths: flag byte then body. 0x04 Content-Length, 0x08 Origin, 0x01 ?z=gzip, 0x02 C-E gzip,
# 0x10 right secret, 0x20 harness gzips, 0x40 repeat.
for k, v in client_batches.items(): write("collect_body", k, b"\x04" + v)
write("collect_body", "origin", b"\x0c" + client_batches["one_event"])
write("collect_body", "gzip_query", b"\x05" + gzip.compress(client_batches["three_events"], mtime=0))
write("collect_body", "gzip_header", b"\x02" + gzip.compress(client_batches["with_counters"], mtime=0))
write("collect_body", "harness_gzip", b"\x20" + client_batches["schemas"])
write("collect_body", "gzip_bomb", b"\x65\xff" + b" " * 2048)  # 255 x 2 KiB of spaces, gzipped
write("collect_body", "too_many_events", b"\x04" + b'{"v":1,"site":"demo","events":[' + b"1," * 60 + b"1]}")
write("batch", "over_the_limit.json", b'{"v":1,"site":"demo","events":[' + b"0," * 5001 + b"0]}")
write("collect_body", "not_gzip", b"\x01" + client_batches["one_event"])
for k, v in server_batches.items(): write("server_events", k, b"\x14" + v)
write("server_events", "wrong_secret", b"\x04" + server_batches["order_paid"])
write("server_events", "gzip", b"\x15" + gzip.compress(server_batches["order_paid"], mtime=0))
write("server_events", "harness_gzip", b"\x30" + server_batches["signup"])
# config
write("config", "demo.toml", open("../relay/demo.toml", "rb").read())
write("config", "empty.toml", b"")
write("config", "test_defaults.toml", b'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\ndata_dir = "/tmp/t/data"\nasset_dir = "/tmp/t/assets"\n\n[rate_limit]\nper_ip_per_sec = 0\nper_site_per_sec = 0\n\n[[sites]]\nkey = "demo"\norigins = ["https://shop.example"]\nserver_secrets = ["test-server-secret-0123456789"]\n')
write("config", "sinks.toml", b'[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n\n[[sinks]]\nname = "warehouse"\nkind = "warehouse"\n\n[[sinks]]\nname = "hook"\nkind = "webhook"\nurl = "https://hooks.example/in"\nsecret_env = "HOOK_SECRET"\nconcurrency = 4\n\n[[sinks]]\nname = "ph"\nkind = "posthog"\nurl = "https://us.i.posthog.com"\nsecret_env = "PH"\nhistorical_migration = true\n\n[[sinks]]\nname = "seg"\nkind = "segment"\nsecret_env = "SEG"\n\n[[sinks]]\nname = "pg"\nkind = "postgres"\nsecret_env = "PG_URL"\n')
write("config", "limits.toml", b'prefix = "/_r/"\ncollect_path = "/q/"\nlog_format = "json"\nadmin_listen = "0.0.0.0:9090"\nadmin_token = "ADMIN-TOKEN-SECRET-0123"\n\n[limits]\nmax_body_bytes = 65536\nmax_decompressed_bytes = 262144\nmax_events_per_batch = 100\nmax_depth = 5\nmax_past_secs = 3600\nmax_future_secs = 60\n\n[spool]\nmax_bytes = 1\nmax_file_bytes = 1048576\nmax_group_requests = 64\n\n[faults]\nfail_ratio = 0.5\nack_lost_ratio = 0.1\nseed = 7\n')
write("config", "old_sink.toml", b'[sink]\nkind = "warehouse"\n')
write("config", "bad_sink.toml", b'[[sinks]]\nname = "k"\nkind = "kafka"\n')
