//! Validation reasons, round-trips, and "validation never panics".

use proptest::prelude::*;
use serde_json::{Value, json};
use trueup_protocol::*;

const NOW: i64 = 1_790_000_000_000;

fn id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn good() -> Value {
    json!({
        "id": id(), "name": "clicked", "schema": "event/1", "ts": NOW - 1000,
        "source": "client", "anon_id": "a1", "device_id": "d1", "seq": 7,
        "props": {"button": "buy", "n": 3},
        "context": {"url": "https://shop.example/p", "attribution": {"first": {"utm_source": "news"}}}
    })
}

fn check(v: &Value) -> Result<Event, Rejection> {
    check_with(v, &SchemaRegistry::builtin())
}

fn check_with(v: &Value, reg: &SchemaRegistry) -> Result<Event, Rejection> {
    validate_event(&v.to_string(), Source::Client, NOW, reg, &Limits::default())
}

fn reason_of(v: Value) -> Reason {
    check(&v).expect_err("should be rejected").reason
}

fn with(mut v: Value, key: &str, new: Value) -> Value {
    v[key] = new;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[test]
fn a_good_event_is_accepted() {
    let e = check(&good()).expect("valid");
    assert_eq!(e.name, "clicked");
    assert_eq!(e.seq, Some(7));
}

#[test]
fn each_defect_has_its_reason() {
    assert_eq!(reason_of(without(good(), "id")), Reason::MissingId);
    assert_eq!(
        reason_of(with(good(), "id", json!("nope"))),
        Reason::InvalidId
    );
    assert_eq!(reason_of(with(good(), "id", json!(12))), Reason::InvalidId);
    // A valid UUID of another version is not an idempotency key we issue.
    assert_eq!(
        reason_of(with(
            good(),
            "id",
            json!("67e55044-10b1-426f-9247-bb680e5fe0c8")
        )),
        Reason::InvalidId
    );
    assert_eq!(
        reason_of(without(good(), "anon_id")),
        Reason::InvalidEnvelope
    );
    assert_eq!(
        reason_of(with(good(), "ts", json!("yesterday"))),
        Reason::InvalidEnvelope
    );
    assert_eq!(
        reason_of(with(good(), "extra", json!(1))),
        Reason::InvalidEnvelope
    );
    assert_eq!(reason_of(json!([1, 2])), Reason::InvalidEnvelope);
    assert_eq!(
        reason_of(with(good(), "name", json!(""))),
        Reason::InvalidName
    );
    assert_eq!(
        reason_of(with(good(), "anon_id", json!("a\u{0}b"))),
        Reason::InvalidField
    );
    assert_eq!(
        reason_of(with(good(), "schema", json!("nope/1"))),
        Reason::UnknownSchema
    );
    assert_eq!(
        reason_of(with(good(), "schema", json!("page_view/1"))),
        Reason::SchemaMismatch
    );
    assert_eq!(
        reason_of(with(good(), "ts", json!(NOW + 2 * 86_400_000))),
        Reason::TsOutOfRange
    );
    assert_eq!(
        reason_of(with(good(), "ts", json!(0))),
        Reason::TsOutOfRange
    );
    assert_eq!(
        reason_of(with(good(), "source", json!("server"))),
        Reason::WrongSource
    );
    assert_eq!(reason_of(without(good(), "seq")), Reason::MissingSeq);
    let big = "x".repeat(40 * 1024);
    assert_eq!(
        reason_of(with(good(), "props", json!({ "big": big }))),
        Reason::TooLarge
    );
    let mut deep = json!(1);
    for _ in 0..12 {
        deep = json!([deep]);
    }
    assert_eq!(
        reason_of(with(good(), "props", json!({ "deep": deep }))),
        Reason::TooDeep
    );
}

#[test]
fn too_large_keeps_the_id_when_it_can() {
    let big = "x".repeat(40 * 1024);
    let v = with(good(), "props", json!({ "big": big }));
    let r = check(&v).unwrap_err();
    assert_eq!(
        r.id.map(|u| u.to_string()),
        v["id"].as_str().map(String::from)
    );
}

#[test]
fn user_schemas_check_props() {
    let mut reg = SchemaRegistry::builtin();
    let def: SchemaDef = serde_json::from_value(json!({
        "name": "signup_completed", "version": 1, "additional_props": false,
        "props": {"plan": {"type": "string", "required": true}, "seats": {"type": "integer"}}
    }))
    .unwrap();
    reg.register(def.clone()).unwrap();
    reg.register(def.clone())
        .expect("identical re-registration is fine");
    let mut changed = def.clone();
    changed.additional_props = true;
    assert!(matches!(
        reg.register(changed),
        Err(SchemaError::Conflict(_))
    ));

    let base = with(
        with(good(), "name", json!("signup_completed")),
        "schema",
        json!("signup_completed/1"),
    );
    let ok = with(base.clone(), "props", json!({"plan": "pro", "seats": 3}));
    assert!(check_with(&ok, &reg).is_ok());
    let r = |v: Value| check_with(&v, &reg).unwrap_err().reason;
    assert_eq!(
        r(with(base.clone(), "props", json!({"seats": 3}))),
        Reason::MissingProp
    );
    assert_eq!(
        r(with(base.clone(), "props", json!({"plan": 1}))),
        Reason::PropTypeMismatch
    );
    assert_eq!(
        r(with(
            base.clone(),
            "props",
            json!({"plan": "a", "seats": 1.5})
        )),
        Reason::PropTypeMismatch
    );
    assert_eq!(
        r(with(base.clone(), "props", json!({"plan": "a", "x": 1}))),
        Reason::UnknownProp
    );
    assert_eq!(
        r(with(base, "schema", json!("signup_completed/2"))),
        Reason::UnknownSchema
    );
}

#[test]
fn raw_batches_count_past_the_cap_without_keeping() {
    let n = MAX_EVENTS_PER_BATCH_LIMIT + 10;
    let body = format!("{{\"v\":1,\"events\":[{}]}}", vec!["{}"; n].join(","));
    let b: RawBatch = serde_json::from_str(&body).unwrap();
    assert_eq!(b.events.total, n);
    assert_eq!(b.events.items.len(), MAX_EVENTS_PER_BATCH_LIMIT);
}

#[test]
fn counters_identity() {
    let mut c = Counters {
        device_id: "d".into(),
        enqueued: 10,
        acked: 6,
        pending: 2,
        ..Default::default()
    };
    assert!(!c.identity_holds());
    c.dropped.insert("queue_full".into(), 2);
    assert!(c.identity_holds());
    c.enqueued = u64::MAX;
    c.acked = u64::MAX;
    assert!(
        !c.identity_holds(),
        "overflow must not wrap into a false positive"
    );
}

fn arb_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ .:/-]{1,40}"
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|n| json!(n)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn arb_event()(
        name in arb_text(), anon in arb_text(), user in proptest::option::of(arb_text()),
        seq in proptest::option::of(any::<u64>()), ts in any::<i64>(),
        props in prop::collection::btree_map("[a-z]{1,8}", arb_json(), 0..5),
        url in proptest::option::of(".{0,30}"), server in any::<bool>(),
    ) -> Event {
        Event {
            id: uuid::Uuid::now_v7(), name, schema: "event/1".into(), ts,
            source: if server { Source::Server } else { Source::Client },
            anon_id: anon, user_id: user, session_id: None, device_id: seq.map(|_| "dev".into()), seq,
            props: props.into_iter().collect(),
            context: Context { url, ..Default::default() },
        }
    }
}

proptest! {
    #[test]
    fn events_round_trip(e in arb_event()) {
        let text = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back, e);
    }

    #[test]
    fn batches_round_trip(events in prop::collection::vec(arb_event(), 0..4), enq in any::<u32>()) {
        let b = Batch {
            v: PROTOCOL_VERSION, site: Some("pk".into()), sent_at: Some(NOW),
            counters: Some(Counters { device_id: "d".into(), enqueued: enq.into(), ..Default::default() }),
            events,
        };
        let back: Batch = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        prop_assert_eq!(back, b);
    }

    #[test]
    fn validation_never_panics_on_bytes(s in ".{0,400}") {
        let _ = validate_event(&s, Source::Client, NOW, &SchemaRegistry::builtin(), &Limits::default());
    }

    #[test]
    fn validation_never_panics_on_json(v in arb_json(), patch in arb_json()) {
        let reg = SchemaRegistry::builtin();
        let _ = validate_event(&v.to_string(), Source::Client, NOW, &reg, &Limits::default());
        // Mutate one field of a good event into arbitrary JSON.
        let mut g = good();
        let keys: Vec<String> = g.as_object().unwrap().keys().cloned().collect();
        let key = &keys[(patch.to_string().len()) % keys.len()];
        g[key] = patch;
        let _ = validate_event(&g.to_string(), Source::Client, NOW, &reg, &Limits::default());
    }

    #[test]
    fn valid_events_validate(mut e in arb_event()) {
        e.ts = NOW;
        e.source = Source::Client;
        e.seq = Some(1);
        e.device_id = Some("dev".into());
        let text = serde_json::to_string(&e).unwrap();
        let limits = Limits { max_event_bytes: 1 << 20, max_depth: 64, ..Limits::default() };
        let got = validate_event(&text, Source::Client, NOW, &SchemaRegistry::builtin(), &limits);
        prop_assert_eq!(got.map_err(|r| r.reason), Ok(e));
    }
}
