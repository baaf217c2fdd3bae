//! How the PostgreSQL warehouse should take a batch: what [`Warehouse::write`] runs, `COPY …
//! FROM STDIN (FORMAT binary)` into a temporary table followed by `INSERT … SELECT … ON
//! CONFLICT (id) DO NOTHING`, against the one-statement `unnest` insert (arrays as
//! parameters) it replaced; both in one transaction per batch, both idempotent.
//!
//! ```text
//! export TRUEUP_TEST_POSTGRES=$(.ci/postgres)
//! cargo run --release -p trueup-warehouse --example pg_insert -- [events] [batch] [rounds]
//! ```
//!
//! Defaults: 100,000 events in batches of 2,000 (the postgres sink's default batch size),
//! 5 rounds. Each round writes the same events once with each method into an emptied table
//! (the order alternates between rounds), then re-delivers the first batch (all conflicts).
//! It prints each method's median events/s and the ratio COPY/unnest. Everything runs in a
//! schema of its own, dropped at the end.

use std::time::Instant;

use trueup_warehouse::{EventRow, Warehouse};

struct Owned {
    id: String,
    session: String,
    device: String,
    props: String,
    context: String,
}

fn events(n: usize) -> Vec<Owned> {
    (0..n)
        .map(|i| Owned {
            id: format!("0193a6c0-0000-7000-8000-{i:012x}"),
            session: format!("s{}", i / 20),
            device: format!("d{}", i / 200),
            props: format!(r#"{{"sku":"sku-{i}","price":1999,"currency":"EUR","qty":{}}}"#, i % 5),
            context: r#"{"url":"https://shop.example/p/42?utm_source=newsletter","referrer":"https://mail.example/","title":"A product page","attribution":{"source":"newsletter","medium":"email"}}"#.to_string(),
        })
        .collect()
}

fn row(e: &Owned, i: usize) -> EventRow<'_> {
    EventRow {
        id: &e.id,
        name: "product_viewed",
        schema: "product_viewed/1",
        source: "client",
        site: "shop",
        ts: 1_764_324_000_000 + i as i64,
        received_at: 1_764_324_000_500 + i as i64,
        anon_id: &e.device,
        user_id: None,
        session_id: Some(&e.session),
        device_id: Some(&e.device),
        seq: Some(i as i64),
        props: &e.props,
        context: &e.context,
        logged_at: None,
    }
}

/// The alternative: one statement, each column an array parameter, through `unnest`.
fn write_unnest<'a>(
    client: &mut postgres::Client,
    rows: &[EventRow<'a>],
) -> Result<u64, postgres::Error> {
    let mut tx = client.transaction()?;
    let text = |f: fn(&EventRow<'a>) -> &'a str| rows.iter().map(f).collect::<Vec<_>>();
    let opt = |f: fn(&EventRow<'a>) -> Option<&'a str>| rows.iter().map(f).collect::<Vec<_>>();
    let int = |f: fn(&EventRow<'a>) -> i64| rows.iter().map(f).collect::<Vec<_>>();
    let seqs: Vec<Option<i64>> = rows.iter().map(|e| e.seq).collect();
    let new = tx.execute(
        "INSERT INTO events
         (id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq, props, context)
         SELECT id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq,
                props::jsonb, context::jsonb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::text[], $14::text[])
              AS t (id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq, props, context)
         ON CONFLICT (id) DO NOTHING",
        &[
            &text(|e| e.id),
            &text(|e| e.name),
            &text(|e| e.schema),
            &text(|e| e.source),
            &text(|e| e.site),
            &int(|e| e.ts),
            &int(|e| e.received_at),
            &text(|e| e.anon_id),
            &opt(|e| e.user_id),
            &opt(|e| e.session_id),
            &opt(|e| e.device_id),
            &seqs,
            &text(|e| e.props),
            &text(|e| e.context),
        ],
    )?;
    tx.commit()?;
    Ok(new)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("TRUEUP_TEST_POSTGRES")
        .map_err(|_| "set TRUEUP_TEST_POSTGRES (export TRUEUP_TEST_POSTGRES=$(.ci/postgres))")?;
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let n = args.next().transpose()?.unwrap_or(100_000);
    let batch = args.next().transpose()?.unwrap_or(2_000).max(1);
    let rounds = args.next().transpose()?.unwrap_or(5).max(1);

    let schema = format!("insert_bench_{}", std::process::id());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
    admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options=-csearch_path%3D{schema}");
    let result = run(&scoped, n, batch, rounds);
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    result
}

fn run(url: &str, n: usize, batch: usize, rounds: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut wh = Warehouse::connect_postgres(url)?;
    let owned = events(n);
    let rows: Vec<EventRow> = owned.iter().enumerate().map(|(i, e)| row(e, i)).collect();
    let (mut unnest, mut copy, mut unnest_dup, mut copy_dup) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!("{n} events, batches of {batch}, {rounds} rounds");
    for round in 0..rounds {
        for m in [round % 2, 1 - round % 2] {
            let Warehouse::Postgres(client) = &mut wh else {
                unreachable!()
            };
            client.batch_execute("TRUNCATE events")?;
            let t = Instant::now();
            let mut stored = 0;
            for chunk in rows.chunks(batch) {
                stored += if m == 0 {
                    wh.write(chunk, &[])?
                } else {
                    let Warehouse::Postgres(client) = &mut wh else {
                        unreachable!()
                    };
                    write_unnest(client, chunk)?
                };
            }
            let rate = n as f64 / t.elapsed().as_secs_f64();
            assert_eq!(stored, n as u64, "every event stored once");
            let first = &rows[..batch.min(n)];
            let t = Instant::now();
            let again = if m == 0 {
                wh.write(first, &[])?
            } else {
                let Warehouse::Postgres(client) = &mut wh else {
                    unreachable!()
                };
                write_unnest(client, first)?
            };
            let dup_rate = first.len() as f64 / t.elapsed().as_secs_f64();
            assert_eq!(again, 0, "a re-delivery stores nothing");
            let name = if m == 0 { "copy" } else { "unnest" };
            println!(
                "round {round} {name:6}: {rate:9.0} events/s, re-delivery {dup_rate:9.0} events/s"
            );
            if m == 0 {
                copy.push(rate);
                copy_dup.push(dup_rate);
            } else {
                unnest.push(rate);
                unnest_dup.push(dup_rate);
            }
        }
    }
    let (u, c) = (median(unnest), median(copy));
    let (ud, cd) = (median(unnest_dup), median(copy_dup));
    println!(
        "median unnest {u:.0} events/s, copy {c:.0} events/s: copy/unnest {:.2}x",
        c / u
    );
    println!(
        "median re-delivery unnest {ud:.0} events/s, copy {cd:.0} events/s: copy/unnest {:.2}x",
        cd / ud
    );
    Ok(())
}
