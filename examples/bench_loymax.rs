//! Benchmark (not a test), run by `scripts/bench-loymax`: a mixed Loymax stream (purchases
//! dominating) published through a topic exchange into a quorum queue, drained alternately by
//! (a) a bare consumer on the same AMQP client with the same prefetch that only acks, and (b)
//! `subgate serve` end to end (decode, dedupe, project, durable commit, ack). Prints messages/s
//! of each run, the median ratio b/a, and subgate's peak RSS.

#[path = "support/cpu_sample.rs"]
mod cpu_sample;

use cpu_sample::CpuSample;
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use amqprs::{
    channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments,
        Channel, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
        QueueDeclareArguments, QueueDeleteArguments,
    },
    connection::{Connection, OpenConnectionArguments},
    BasicProperties, FieldTable, FieldValue,
};
use anyhow::{bail, Context};
use clap::Parser;
use subgate::{
    config::{ConfigSource, Settings},
    sources::loymax::ROUTING_KEYS,
};

const PURCHASE: &str = include_str!("../tests/fixtures/loymax/purchase_confirm.json");
const REFUND: &str = include_str!("../tests/fixtures/loymax/purchase_refund.json");
const ATTRIBUTE: &str = include_str!("../tests/fixtures/loymax/attribute_update.json");
const SUBSCRIPTION: &str = include_str!("../tests/fixtures/loymax/subscription_update.json");
const BLOCK: &str = include_str!("../tests/fixtures/loymax/card_block.json");
const CATEGORY: &str = include_str!("../tests/fixtures/loymax/card_category.json");
const ACTIVATION: &str = include_str!("../tests/fixtures/loymax/card_activation.json");
const BEGIN: &str = include_str!("../tests/fixtures/loymax/registration_begin.json");
const LINK: &str = include_str!("../tests/fixtures/loymax/card_link_replace.json");

#[derive(Parser)]
struct Args {
    /// The release `subgate` binary.
    #[arg(long)]
    subgate: PathBuf,
    /// Messages per run.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Distinct members the stream is about.
    #[arg(long, default_value_t = 20_000)]
    members: u32,
    /// Runs of each consumer, alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only one event type instead of the mix (to see what each costs): purchase, refund,
    /// attribute, subscription, block, category, activation, registration, link.
    #[arg(long)]
    only: Option<String>,
}

/// The roll (0..100) that picks each event type in [`stream`].
fn roll_of(only: &str) -> anyhow::Result<u32> {
    Ok(match only {
        "purchase" => 0,
        "refund" => 70,
        "attribute" => 75,
        "subscription" => 83,
        "block" => 88,
        "category" => 92,
        "activation" => 95,
        "registration" => 97,
        "link" => 99,
        other => bail!("--only {other}: not an event type of the mix"),
    })
}

/// The stream: (routing key, body). Shares: 70 % purchases, 5 % refunds, 8 % attribute updates,
/// 5 % subscription changes, 4 % block/unblock, 3 % category changes, 2 % activations, 2 %
/// registrations, 1 % card links.
fn stream(n: usize, members: u32, only: Option<u32>) -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(4);
    let mut purchases: Vec<u64> = Vec::new();
    (0..n)
        .map(|i| {
            let i = i as u64;
            let member = rng.u32(1..=members);
            let customer = format!("\"customerId\":{member}");
            let card = u64::from(member) * 2;
            let roll = only.unwrap_or_else(|| rng.u32(0..100));
            let (key, body) = match roll {
                0..70 => {
                    let id = 1_000_000 + i;
                    purchases.push(id);
                    let amount = format!("{}.{:04}", rng.u32(1..5000), rng.u32(0..10000));
                    (
                        "purchases.confirm.modelUpdate",
                        PURCHASE
                            .replace("\"customerId\":107", &customer)
                            .replace("\"purchaseId\":512", &format!("\"purchaseId\":{id}"))
                            .replace("5226324048", &format!("{}", 7_000_000_000 + i))
                            .replace("\"amount\":135.0000", &format!("\"amount\":{amount}")),
                    )
                }
                70..75 => {
                    let refunded = purchases
                        .get(rng.usize(0..purchases.len().max(1)))
                        .copied()
                        .unwrap_or(512);
                    (
                        "purchases.refundModelUpdate",
                        REFUND
                            .replace("\"customerId\":107", &customer)
                            .replace(
                                "\"purchaseId\":513",
                                &format!("\"purchaseId\":{}", 5_000_000 + i),
                            )
                            .replace(
                                "\"refundedPurchaseId\":512",
                                &format!("\"refundedPurchaseId\":{refunded}"),
                            ),
                    )
                }
                75..83 => {
                    let (code, value) = if rng.bool() {
                        ("Phone", format!("7954{:07}", member))
                    } else {
                        ("Email", format!("member{member}@пример.рф"))
                    };
                    (
                        "customer.attribute.update",
                        ATTRIBUTE
                            .replace("\"customerId\":126", &customer)
                            .replace(
                                "\"attributeCode\":\"Phone\"",
                                &format!("\"attributeCode\":\"{code}\""),
                            )
                            .replace(
                                "\"newValue\":\"79540286267\"",
                                &format!("\"newValue\":\"{value}\""),
                            )
                            .replace(
                                "5c4b232b-aa2d-4bff-b393-9f60b9b8c1f1",
                                &format!("activity-{i}"),
                            ),
                    )
                }
                83..88 => {
                    let state = if rng.bool() { "Enabled" } else { "Disabled" };
                    (
                        "customer.subscription.update",
                        SUBSCRIPTION
                            .replace("\"customerId\":164", &customer)
                            .replace("\"mail\":\"Enabled\"", &format!("\"mail\":\"{state}\"")),
                    )
                }
                88..92 => (
                    "customer.card.changeBlockState",
                    BLOCK
                        .replace("\"customerId\": 18", &format!("\"customerId\": {member}"))
                        .replace("\"cardId\": 13", &format!("\"cardId\": {card}"))
                        .replace(
                            "\"targetBlockState\": true",
                            &format!("\"targetBlockState\": {}", rng.bool()),
                        )
                        .replace("73d812984ef44a9fb7f1200a41ac7aba", &format!("ext-{i}")),
                ),
                92..95 => (
                    "\u{0441}ustomer.card.changeCategory",
                    CATEGORY
                        .replace("\"customerId\":42", &customer)
                        .replace("\"cardId\":39", &format!("\"cardId\":{card}"))
                        .replace("VIP", ["Silver", "Gold", "VIP"][rng.usize(0..3)]),
                ),
                95..97 => (
                    "customer.card.changeState",
                    ACTIVATION
                        .replace("\"customerId\":24", &customer)
                        .replace("\"cardId\":20", &format!("\"cardId\":{card}")),
                ),
                97..99 => (
                    "customer.registration.begin",
                    BEGIN.replace("\"customerId\":121", &customer),
                ),
                _ => (
                    "customer.card.link",
                    LINK.replace("\"customerId\":11", &customer)
                        .replace("\"cardId\":6", &format!("\"cardId\":{card}"))
                        .replace("\"cardId\":5", &format!("\"cardId\":{}", card + 1)),
                ),
            };
            (key, body.into_bytes())
        })
        .collect()
}

struct Topology {
    exchange: String,
    queue: String,
}

fn text(s: &str) -> FieldValue {
    FieldValue::from(s.to_owned())
}

/// Declare the exchange, and the quorum queue with exactly the arguments subgate declares
/// (subgate then runs with `loymax.declare = false` and only verifies them).
async fn declare(ch: &Channel, settings: &Settings, t: &Topology) -> anyhow::Result<()> {
    let dlx = &settings.amqp.dead_letter_exchange;
    ch.exchange_declare(
        ExchangeDeclareArguments::new(dlx, "direct")
            .durable(true)
            .finish(),
    )
    .await?;
    ch.exchange_declare(
        ExchangeDeclareArguments::new(&t.exchange, "topic")
            .durable(true)
            .finish(),
    )
    .await?;
    let mut args = FieldTable::new();
    let name = |n: &str| n.try_into().map_err(|_| anyhow::anyhow!("field name {n}"));
    args.insert(name("x-queue-type")?, text("quorum"));
    args.insert(name("x-dead-letter-exchange")?, text(dlx));
    args.insert(name("x-dead-letter-routing-key")?, text(&t.queue));
    args.insert(name("x-dead-letter-strategy")?, text("at-least-once"));
    args.insert(name("x-overflow")?, text("reject-publish"));
    args.insert(
        name("x-delivery-limit")?,
        FieldValue::l(i64::from(settings.amqp.delivery_limit)),
    );
    ch.queue_declare(
        QueueDeclareArguments::new(&t.queue)
            .durable(true)
            .arguments(args)
            .finish(),
    )
    .await?;
    for key in ROUTING_KEYS {
        ch.queue_bind(QueueBindArguments::new(&t.queue, &t.exchange, key))
            .await?;
    }
    Ok(())
}

async fn teardown(ch: &Channel, t: &Topology) {
    let _ = ch.queue_delete(QueueDeleteArguments::new(&t.queue)).await;
    let _ = ch
        .queue_delete(QueueDeleteArguments::new(&format!("{}.dead", t.queue)))
        .await;
    let _ = ch
        .exchange_delete(ExchangeDeleteArguments::new(&t.exchange))
        .await;
}

async fn publish(
    conn: &Connection,
    t: &Topology,
    stream: &[(&str, Vec<u8>)],
) -> anyhow::Result<()> {
    let ch = conn.open_channel(None).await?;
    ch.tx_select().await?;
    for chunk in stream.chunks(1000) {
        for (key, body) in chunk {
            let props = BasicProperties::default().with_persistence(true).finish();
            ch.basic_publish(
                props,
                body.clone(),
                BasicPublishArguments::new(&t.exchange, key),
            )
            .await?;
        }
        ch.tx_commit().await?;
    }
    let _ = ch.close().await;
    let ready = ready_count(conn, &t.queue).await?;
    if ready as usize != stream.len() {
        bail!(
            "queue holds {ready} messages after publishing {}",
            stream.len()
        );
    }
    Ok(())
}

async fn ready_count(conn: &Connection, queue: &str) -> anyhow::Result<u32> {
    let ch = conn.open_channel(None).await?;
    let declared = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await?
        .context("declare-ok")?;
    let _ = ch.close().await;
    Ok(declared.1)
}

/// (a): consume and ack (multiple = true every half prefetch), nothing else.
async fn drain_bare(
    conn: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
) -> anyhow::Result<(Duration, String)> {
    let me = vec![std::process::id().to_string()];
    let ch = conn.open_channel(None).await?;
    ch.basic_qos(BasicQosArguments::new(0, prefetch, false))
        .await?;
    let ack_every = (usize::from(prefetch) / 2).max(1);
    let started = Instant::now();
    let cpu0 = CpuSample::now(&me);
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await?;
    let mut count = 0;
    while let Some(message) = rx.recv().await {
        let Some(deliver) = message.deliver else {
            continue;
        };
        count += 1;
        if count % ack_every == 0 || count == n {
            ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), true))
                .await?;
        }
        if count == n {
            break;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu0.describe(&CpuSample::now(&me), n);
    let _ = ch.close().await;
    Ok((elapsed, cpu))
}

/// The value of an unlabelled sample (`name value`) on a Prometheus page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .sum()
}

/// Sum of `subgate_committed_total{source="loymax",…}` on a Prometheus page.
fn committed(page: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with("subgate_committed_total{") && l.contains("source=\"loymax\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (b): `subgate serve` from ready (consuming) until every message is committed.
async fn drain_subgate(
    args: &Args,
    t: &Topology,
    n: usize,
) -> anyhow::Result<(Duration, u64, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("subgate-bench-loymax-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("subgate.log"))?;
    let mut child = Command::new(&args.subgate)
        .arg("serve")
        .env("SUBGATE__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env(
            "SUBGATE__STORE__URL",
            format!("sqlite://{}", dir.join("subgate.db").display()),
        )
        .env("SUBGATE__ERP__ENABLED", "false")
        .env("SUBGATE__LOYMAX__ENABLED", "true")
        .env("SUBGATE__LOYMAX__DECLARE", "false")
        .env("SUBGATE__LOYMAX__QUEUE", &t.queue)
        .env("SUBGATE__LOYMAX__EXCHANGE", &t.exchange)
        .env("SUBGATE__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start subgate")?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let wait_until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        if Instant::now() > wait_until {
            let _ = child.kill();
            bail!(
                "subgate not ready within 30 s (log: {})",
                dir.join("subgate.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let pids = vec![child.id().to_string()];
    let cpu0 = CpuSample::now(&pids);
    loop {
        let page = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if committed(&page) as usize >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            bail!("subgate did not commit {n} messages within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu0.describe(&CpuSample::now(&pids), n);
    let rss = peak_rss_kb(child.id()).unwrap_or(0);
    let page = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let batches = sample(&page, "subgate_batch_size_count");
    println!(
        "       subgate: {batches} commits, mean batch {:.0} events, mean commit {:.1} ms",
        sample(&page, "subgate_batch_size_sum") / batches.max(1.0),
        1000.0 * sample(&page, "subgate_commit_seconds_sum") / batches.max(1.0)
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait()?;
    if !status.success() {
        bail!("subgate exited with {status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((elapsed, rss, cpu))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // reqwest is built with rustls: the process-wide crypto provider first.
    subgate::http::tls::install_crypto_provider();
    let args = Args::parse();
    // The same configuration subgate will see (SUBGATE__… variables apply to both consumers).
    let settings = Settings::load(&ConfigSource::from_process(None))?;
    let prefetch = settings.amqp.prefetch;
    let n = args.messages;
    let only = args.only.as_deref().map(roll_of).transpose()?;
    let stream = stream(n, args.members, only);
    let bytes: usize = stream.iter().map(|(_, b)| b.len()).sum();
    println!(
        "Loymax stream ({}): {n} persistent messages, {} distinct members, \
         mean body {} bytes; quorum queue via a topic exchange; prefetch {prefetch}",
        args.only.as_deref().unwrap_or("mixed, 70% purchases"),
        args.members,
        bytes / n.max(1)
    );
    let conn = Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .context("RabbitMQ on 127.0.0.1:5672")?;
    let admin = conn.open_channel(None).await?;
    let mut ratios = Vec::new();
    let mut peak = 0;
    for run in 1..=args.runs {
        let t = Topology {
            exchange: format!("bench-loymax-ex-{run}-{}", std::process::id()),
            queue: format!("bench-loymax-{run}-{}", std::process::id()),
        };
        declare(&admin, &settings, &t).await?;
        publish(&conn, &t, &stream).await?;
        let (bare, bare_cpu) = drain_bare(&conn, &t.queue, n, prefetch).await?;
        teardown(&admin, &t).await;

        declare(&admin, &settings, &t).await?;
        publish(&conn, &t, &stream).await?;
        let (served, rss, served_cpu) = drain_subgate(&args, &t, n).await?;
        let left = ready_count(&conn, &t.queue).await?;
        let dead = ready_count(&conn, &settings.dead_letter_queue_for(&t.queue))
            .await
            .unwrap_or(0);
        teardown(&admin, &t).await;

        let a = n as f64 / bare.as_secs_f64();
        let b = n as f64 / served.as_secs_f64();
        ratios.push(b / a);
        peak = peak.max(rss);
        println!(
            "run {run}: (a) bare consumer {a:>9.0} msg/s | (b) subgate {b:>9.0} msg/s | b/a {:.2} | \
             subgate peak RSS {:.1} MB | left in queue {left}, dead-lettered {dead}",
            b / a,
            rss as f64 / 1024.0
        );
        println!("       (a) {bare_cpu}\n       (b) {served_cpu}");
    }
    println!(
        "median b/a: {:.2} (goal >= 0.70); subgate peak RSS {:.1} MB",
        median(ratios),
        peak as f64 / 1024.0
    );
    let _ = admin.close().await;
    let _ = conn.close().await;
    Ok(())
}
