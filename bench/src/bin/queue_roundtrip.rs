//! Queue round-trip benchmark: starts its own redis-server on loopback and measures
//! 1. the sequential round trip of one job (enqueue → claim → complete) and each call in it,
//!    plus a progress report: the per-job protocol overhead;
//! 2. throughput: N jobs enqueued, then drained by 1 and by 8 workers (claim → complete).
//!
//! `cargo run --release -p pawfect-bench --bin queue-roundtrip -- [--jobs N] [--workers 1,8] [--aof always|everysec]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pawfect_api::InpaintJobSpec;
use pawfect_queue::testing::{AofFsync, RedisServer, RedisServerOptions};
use pawfect_queue::{JobRef, JobResult, Outcome, Progress, Queue, QueueConfig};

#[derive(Parser, Debug)]
#[command(about = "Round trip and throughput of the Redis queue protocol")]
struct Args {
    /// Jobs per measurement.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Worker counts for the throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    workers: Vec<usize>,
    /// Run redis with an append-only file, fsynced `always` (every write on disk before its
    /// reply) or `everysec`; default: no persistence.
    #[arg(long, value_parser = ["always", "everysec"])]
    aof: Option<String>,
}

fn spec(i: usize) -> Result<InpaintJobSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "image": format!("s3://pawfect-in/photos/{i}.jpg"),
        "mask": format!("s3://pawfect-in/masks/{i}.png"),
        "output": format!("s3://pawfect-out/{i}.png"),
        "pool": "bench",
        "sceneLabels": ["grass", "path"],
    }))?)
}

fn result(i: usize) -> JobResult {
    JobResult {
        output: format!("s3://pawfect-out/{i}.png"),
        caption: Some("a dog on a leash walking on grass".into()),
        prompt: Some("grass, seamless continuation, no objects".into()),
        prompt_source: Some("sceneLabels".into()),
        timings: Default::default(),
        work: None,
    }
}

struct Stats {
    samples: Vec<f64>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            samples: Vec::new(),
        }
    }
    fn add(&mut self, d: Duration) {
        self.samples.push(d.as_secs_f64() * 1e3);
    }
    fn line(&mut self, name: &str) -> String {
        self.samples.sort_by(|a, b| a.total_cmp(b));
        let n = self.samples.len().max(1);
        let pct = |p: f64| self.samples[((n as f64 * p) as usize).min(n - 1)];
        let mean = self.samples.iter().sum::<f64>() / n as f64;
        format!(
            "| {name} | {mean:.3} | {:.3} | {:.3} | {:.3} |",
            pct(0.5),
            pct(0.99),
            self.samples.last().copied().unwrap_or(0.0)
        )
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let redis = RedisServer::start_with(RedisServerOptions {
        aof: args.aof.is_some(),
        aof_fsync: match args.aof.as_deref() {
            Some("everysec") => AofFsync::EverySec,
            _ => AofFsync::Always,
        },
        ..Default::default()
    })
    .context("starting redis-server")?;
    let config = QueueConfig {
        block_interval: Duration::from_secs(1),
        ..QueueConfig::new(redis.url())
    };
    let q = Queue::connect(config).await?;
    println!(
        "redis-server on {} ({}), {} jobs per run",
        redis.url(),
        match args.aof.as_deref() {
            Some(f) => format!("AOF, appendfsync {f}"),
            None => "no persistence".to_string(),
        },
        args.jobs
    );

    // 1. Sequential round trip.
    let mut w = q.worker("bench", "seq").await?;
    let (mut enq, mut claim, mut prog, mut done, mut total) = (
        Stats::new(),
        Stats::new(),
        Stats::new(),
        Stats::new(),
        Stats::new(),
    );
    let seq_start = Instant::now();
    for i in 0..args.jobs {
        let job = JobRef::new(format!("seq-{i}"), "bench", format!("job-{i}"));
        let spec = spec(i)?;
        let t0 = Instant::now();
        q.enqueue(&job, &spec).await?;
        let t1 = Instant::now();
        let Some(c) = w.claim(Duration::from_secs(5)).await? else {
            bail!("job {i} was not claimed");
        };
        let t2 = Instant::now();
        c.progress(&Progress::new("denoise", Some(1), Some(20)))
            .await?;
        let t3 = Instant::now();
        let o = c.complete(&result(i)).await?;
        let t4 = Instant::now();
        if !o.is_finished() {
            bail!("job {i}: {o:?}");
        }
        enq.add(t1 - t0);
        claim.add(t2 - t1);
        prog.add(t3 - t2);
        done.add(t4 - t3);
        total.add((t2 - t0) + (t4 - t3));
    }
    let seq_secs = seq_start.elapsed().as_secs_f64();
    println!("\nSequential, one worker (ms per call):\n");
    println!("| call | mean | p50 | p99 | max |\n|---|---|---|---|---|");
    println!("{}", enq.line("enqueue"));
    println!("{}", claim.line("claim"));
    println!("{}", prog.line("progress (one step)"));
    println!("{}", done.line("complete"));
    println!("{}", total.line("**round trip** enqueue+claim+complete"));
    println!(
        "\nsequential jobs/s (incl. one progress each): {:.0}",
        args.jobs as f64 / seq_secs
    );

    // 1b. Everything one real job does on the queue: enqueue, claim, a progress report per
    //     denoise step (20), two heartbeats, complete.
    let mut full = Stats::new();
    for i in 0..(args.jobs / 10).max(1) {
        let job = JobRef::new(format!("full-{i}"), "bench", format!("job-{i}"));
        let spec = spec(i)?;
        let t0 = Instant::now();
        q.enqueue(&job, &spec).await?;
        let Some(c) = w.claim(Duration::from_secs(5)).await? else {
            bail!("job {i} was not claimed");
        };
        for step in 1..=20 {
            c.progress(&Progress::new("denoise", Some(step), Some(20)))
                .await?;
        }
        c.heartbeat().await?;
        c.heartbeat().await?;
        if !c.complete(&result(i)).await?.is_finished() {
            bail!("job {i} did not finish");
        }
        full.add(t0.elapsed());
    }
    println!(
        "\nWhole protocol of one job (enqueue, claim, 20 progress, 2 heartbeats, complete), ms:\n"
    );
    println!("| | mean | p50 | p99 | max |\n|---|---|---|---|---|");
    println!("{}", full.line("per job"));

    // 2. Throughput: enqueue N, then W workers drain them.
    println!("\nThroughput (N jobs enqueued, then drained by W workers, claim → complete):\n");
    println!("| workers | enqueue jobs/s | drain jobs/s |\n|---|---|---|");
    for &workers in &args.workers {
        let pool = format!("tp{workers}");
        let t0 = Instant::now();
        for i in 0..args.jobs {
            let mut s = spec(i)?;
            s.pool = pool.clone();
            q.enqueue(
                &JobRef::new(format!("{pool}-{i}"), "bench", format!("j{i}")),
                &s,
            )
            .await?;
        }
        let enq_rate = args.jobs as f64 / t0.elapsed().as_secs_f64();
        let left = Arc::new(AtomicUsize::new(args.jobs));
        let finished_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|n| {
                let (q, pool, left) = (q.clone(), pool.clone(), left.clone());
                let finished_at = finished_at.clone();
                tokio::spawn(async move {
                    let mut w = q.worker(&pool, &format!("w{n}")).await?;
                    while left.load(Ordering::SeqCst) > 0 {
                        if let Some(c) = w.claim(Duration::from_millis(200)).await? {
                            match c.complete(&result(0)).await? {
                                Outcome::Finished(_) => {
                                    // The run ends with the last completion, not when idle
                                    // workers notice there is nothing left.
                                    if left.fetch_sub(1, Ordering::SeqCst) == 1
                                        && let Ok(mut f) = finished_at.lock()
                                    {
                                        *f = Some(Instant::now());
                                    }
                                }
                                other => anyhow::bail!("unexpected {other:?}"),
                            }
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let end = finished_at
            .lock()
            .ok()
            .and_then(|f| *f)
            .context("no completion time recorded")?;
        let drain_rate = args.jobs as f64 / (end - t0).as_secs_f64();
        let d = q.depth(&pool).await?;
        if d.waiting + d.running != 0 {
            bail!("pool {pool} not drained: {d:?}");
        }
        println!("| {workers} | {enq_rate:.0} | {drain_rate:.0} |");
    }
    Ok(())
}
