//! The Kafka sink: one message per spooled record, through librdkafka (`rdkafka`).
//!
//! # What the topic gets
//!
//! - **Value**: the record exactly as the relay stored it: an event in the protocol's
//!   envelope (`id`, `name`, `schema`, `ts`, …), or an agent's counters.
//! - **Key**: the event's `session_id` (its `anon_id` when it has none, as server events),
//!   so one session's events land on one partition, in order; counters by `device_id`.
//! - **Headers**: `trueup-kind` (`event` or `counters`), `trueup-id` (the event id, the
//!   idempotency key downstream), `trueup-schema`, `trueup-source`, `trueup-site`,
//!   `trueup-received-at` (ms since the epoch, when the relay acknowledged it).
//! - **Timestamp**: when the relay produced it (Kafka's `CreateTime`).
//!
//! # Guarantees
//!
//! The producer is idempotent (`enable.idempotence=true`) with `acks=all`: a message is
//! delivered when every in-sync replica has it, and librdkafka's own retries never write it
//! twice. A delivery returns only when every record's delivery report has come back: the
//! forwarder moves the sink's cursor after that, never before. Any failed report fails the
//! whole delivery and the forwarder sends the same records again; what had already been
//! written is then in the topic twice, with the same `trueup-id`, and the loader stores it
//! once. A full local queue is back-pressure (the send waits), never a loss. A record larger
//! than `max_event_bytes`, or refused by the broker as too large, is dead-lettered with the
//! reason.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::log::LogMessage;
use super::{Delivery, Sink, SinkError};
use crate::config::SinkConfig;
use crate::spool::Record;
use crate::time::now_ms;

/// The Kafka sink.
pub struct KafkaSink {
    /// The producer; replaced by a new one after a fatal error (see [`KafkaSink::producer`]).
    producer: std::sync::Mutex<Arc<FutureProducer>>,
    config: ClientConfig,
    /// Set when a delivery report says the producer's identity is no longer good.
    replace: std::sync::atomic::AtomicBool,
    topic: String,
    max_event_bytes: usize,
}

/// The librdkafka settings both the sink and the loader start from.
pub fn client_config(
    brokers: &str,
    secret: Option<String>,
    properties: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    if let Some(secret) = secret {
        c.set("sasl.password", secret);
    }
    // librdkafka's `debug` property (`"debug" = "cgrp,fetch"`) logs at debug level.
    c.set_log_level(if properties.contains_key("debug") {
        rdkafka::config::RDKafkaLogLevel::Debug
    } else {
        rdkafka::config::RDKafkaLogLevel::Warning
    });
    c
}

impl KafkaSink {
    /// A sink for `cfg` (kind `kafka`); `secret` is the SASL password, if any.
    pub fn new(cfg: &SinkConfig, secret: Option<String>) -> anyhow::Result<KafkaSink> {
        let timeout_ms = cfg.timeout().as_millis().to_string();
        let mut config = client_config(
            cfg.brokers.as_deref().unwrap_or_default(),
            secret,
            &cfg.properties,
        );
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // A delivery report within the sink's timeout, or the delivery fails (and is
            // retried by the forwarder with the same records).
            .set("message.timeout.ms", &timeout_ms)
            .set(
                "message.max.bytes",
                (cfg.max_event_bytes() + 4096).to_string(),
            );
        let producer: FutureProducer = config.create()?;
        Ok(KafkaSink {
            producer: std::sync::Mutex::new(Arc::new(producer)),
            config,
            replace: std::sync::atomic::AtomicBool::new(false),
            topic: cfg.topic().to_string(),
            max_event_bytes: cfg.max_event_bytes(),
        })
    }

    /// The current producer. An idempotent producer that hit a fatal error (the broker
    /// fenced it, or its sequence numbers could not be kept after timeouts) refuses every
    /// later message, so it is replaced by a new one, with a new producer id: what it may
    /// have written twice carries the same `trueup-id`, which the loader stores once.
    fn producer(&self) -> Result<Arc<FutureProducer>, SinkError> {
        let mut p = self.producer.lock().map_err(|_| SinkError {
            message: "kafka producer lock poisoned".into(),
            retry_after: None,
        })?;
        let fenced = self
            .replace
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let fatal = p.client().fatal_error();
        if fenced || fatal.is_some() {
            tracing::warn!(fatal = ?fatal, fenced, "the Kafka producer cannot go on; starting a new one");
            metrics::counter!("trueup_kafka_producer_restarts_total").increment(1);
            let fresh: FutureProducer = self.config.create().map_err(|e| SinkError {
                message: format!("cannot create a new Kafka producer: {e}"),
                retry_after: None,
            })?;
            *p = Arc::new(fresh);
        }
        Ok(p.clone())
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Whatever is in flight was not acknowledged to the forwarder: no need to wait long.
        if let Ok(p) = self.producer.lock() {
            let _ = p.flush(Duration::from_secs(1));
        }
    }
}

/// Whether a delivery error means the producer's id or epoch is no longer accepted (after
/// timeouts, a broker may fence it): only a new producer can write again.
fn identity_lost(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// Whether a producer error means "this record can never be written".
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let fail = |message: String| SinkError {
            message,
            retry_after: None,
        };
        let producer = self.producer()?;
        let mut delivery = Delivery::default();
        let mut pending = Vec::with_capacity(records.len());
        for r in records.iter() {
            let m = match LogMessage::of(r, self.max_event_bytes) {
                Ok(m) => m,
                Err(reason) => {
                    delivery.rejected.push((r.pos, reason));
                    continue;
                }
            };
            let headers = m
                .headers()
                .fold(OwnedHeaders::new_with_capacity(6), |h, (key, v)| {
                    h.insert(Header {
                        key,
                        value: Some(v),
                    })
                });
            let mut record = FutureRecord::to(&self.topic)
                .payload(r.body.as_str())
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            // A full local queue is back-pressure: wait for room, never drop.
            let future = loop {
                match producer.send_result(record) {
                    Ok(f) => break Some(f),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        metrics::counter!("trueup_kafka_queue_full_total").increment(1);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) if too_large(&e) => {
                        delivery.rejected.push((r.pos, format!("too_large: {e}")));
                        break None;
                    }
                    Err((e, _)) => return Err(fail(format!("cannot produce: {e}"))),
                }
            };
            if let Some(future) = future {
                pending.push((r.pos, r.received_at, future));
            }
        }
        let reports = join_all(
            pending
                .into_iter()
                .map(|(pos, received_at, f)| async move { (pos, received_at, f.await) }),
        )
        .await;
        let mut first_error = None;
        let now = now_ms();
        for (pos, received_at, report) in reports {
            match report {
                Ok(Ok(_)) => {
                    metrics::histogram!("trueup_pipeline_lag_seconds", "stage" => "accepted_to_log")
                        .record((now - received_at).max(0) as f64 / 1000.0);
                }
                Ok(Err((e, _))) if too_large(&e) => {
                    delivery.rejected.push((pos, format!("too_large: {e}")));
                }
                Ok(Err((e, _))) => {
                    if identity_lost(&e) {
                        self.replace
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    first_error.get_or_insert_with(|| format!("delivery failed: {e}"));
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| "the producer went away".to_string());
                }
            }
        }
        match first_error {
            Some(e) => Err(fail(e)),
            None => Ok(delivery),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Broker faults that are hard to cause on a real broker, on librdkafka's own mock
    //! cluster (`rdkafka::mocking`): request errors on produce, a partition's leader moving,
    //! a broker going down; and the dead-lettering of what can never be written.
    use std::collections::HashMap;

    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::{Headers as _, Message as _};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::spool::RecordKind;

    const TOPIC: &str = "raw_events";

    fn sink(brokers: String, timeout_secs: u64, extra: &str) -> KafkaSink {
        let cfg: SinkConfig = toml::from_str(&format!(
            "name = \"log\"\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntimeout_secs = {timeout_secs}\n{extra}"
        ))
        .unwrap();
        KafkaSink::new(&cfg, None).unwrap()
    }

    fn records(n: usize, from: usize) -> Arc<Vec<Record>> {
        Arc::new(
            (from..from + n)
                .map(|i| Record {
                    pos: i as i64,
                    kind: RecordKind::Event,
                    site: "demo".into(),
                    received_at: 1_790_000_000_000 + i as i64,
                    body: format!(
                        r#"{{"id":"0196a1b2-c3d4-7e5f-8a9b-{i:012x}","name":"e","schema":"event/1","ts":1,"source":"client","anon_id":"a","session_id":"s{}","device_id":"d","seq":{i}}}"#,
                        i % 7
                    ),
                })
                .collect(),
        )
    }

    /// Every message of the topic: its `trueup-id` header → how many times it is there.
    fn read_all(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        partitions: i32,
        want: usize,
    ) -> HashMap<String, usize> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "read-all")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut seen = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen.values().sum::<usize>() < want && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "trueup-id"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .expect("every message has its trueup-id");
                *seen.entry(id).or_default() += 1;
            }
        }
        // Anything more (a duplicate) would arrive within a moment.
        let quiet = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < quiet {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "trueup-id"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap();
                *seen.entry(id).or_default() += 1;
            }
        }
        seen
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_errors_and_a_moving_leader_are_retried_without_duplicates() {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(TOPIC, 3, 3).unwrap();
        let s = sink(cluster.bootstrap_servers(), 20, "");
        // Transient answers to the next produce requests: the idempotent producer retries
        // them itself, and its sequence numbers keep the retries from being written twice.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            ],
        );
        let d = s
            .deliver(records(200, 0))
            .await
            .expect("delivered despite the errors");
        assert!(d.rejected.is_empty());
        // Every partition's leader moves off broker 1, which then goes down.
        for p in 0..3 {
            cluster.partition_leader(TOPIC, p, Some(2 + p % 2)).unwrap();
        }
        cluster.broker_down(1).unwrap();
        let d = s
            .deliver(records(200, 200))
            .await
            .expect("delivered after the leader moved");
        assert!(d.rejected.is_empty());
        cluster.broker_up(1).unwrap();
        let seen = read_all(&cluster, 3, 400);
        assert_eq!(seen.len(), 400, "every record is in the topic");
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "written twice: {twice:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_delivery_is_an_error_and_a_record_too_large_is_dead_lettered() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let s = sink(cluster.bootstrap_servers(), 2, "max_event_bytes = 300\n");
        // A body over max_event_bytes is never sent: dead-lettered with the reason.
        let mut rs = (*records(3, 0)).clone();
        rs[1].body = rs[1].body.replace(
            "\"name\":\"e\"",
            &format!("\"name\":\"{}\"", "x".repeat(400)),
        );
        let d = s.deliver(Arc::new(rs)).await.unwrap();
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].0, 1);
        assert!(
            d.rejected[0].1.starts_with("too_large: "),
            "{}",
            d.rejected[0].1
        );
        // The broker refuses every attempt for longer than the sink's timeout: the delivery
        // fails as a whole (the forwarder keeps the records and retries), it is not "taken".
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5000],
        );
        let err = s.deliver(records(5, 10)).await.expect_err("not delivered");
        assert!(err.message.contains("delivery failed"), "{}", err.message);
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        // The same records again (as the forwarder does) go through, once each.
        s.deliver(records(5, 10)).await.expect("delivered on retry");
        let seen = read_all(&cluster, 1, 7);
        assert_eq!(seen.len(), 7);
    }
}
