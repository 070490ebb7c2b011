//! `pawfect-operator run`: the command line, the start-up checks and the wiring of the two
//! controllers, the queue events reader, the HTTP endpoints and optional leader election.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use pawfect_api::{InpaintJob, InpaintPool};
use pawfect_queue::{Queue, QueueConfig};
use tracing::{error, info, warn};

use crate::deployment::{CaSource, SecretKeyRef, WorkerConnection};
use crate::events::{self, Triggers};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::{Context, default_pool, job, pool};

/// Default name of the Lease used for leader election (`--lease-name`; the Helm chart names it
/// after the release, so that two releases in one namespace elect their leaders apart).
pub const LEASE_NAME: &str = "pawfect-operator";

/// The `pawfect-operator` command line.
#[derive(Debug, clap::Parser)]
#[command(name = "pawfect-operator", version, about = "Pawfect Inpaint operator")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
// Parsed once at start-up: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the controllers (InpaintJob, InpaintPool), the queue events reader and the HTTP
    /// endpoints (/metrics, /healthz, /readyz).
    Run(RunArgs),
    /// Check an installation (the Helm chart's `helm test`): Redis answers PING with the
    /// password, and the pool is Ready.
    Check(CheckArgs),
}

/// Flags of `pawfect-operator check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Redis URL of the queue (PAWFECT_REDIS_PASSWORD, when set, overrides or adds the password).
    #[arg(long, env = "PAWFECT_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis server's certificate (rediss://).
    #[arg(long, env = "PAWFECT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// InpaintPool that must be Ready, as `namespace/name` (no pool check when unset).
    #[arg(long)]
    pub pool: Option<String>,
    /// How long to wait for the pool to become Ready.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    pub timeout: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 60s)"))
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The flag value (`text`, `json`), as the worker's `--log-format`/`PAWFECT_LOG_FORMAT` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Flags of `pawfect-operator run` (each also read from the environment variable named).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Redis URL of the queue: redis://[user][:password@]host[:port][/db], rediss:// for TLS.
    /// The environment variable PAWFECT_REDIS_PASSWORD, when set, overrides or adds the password.
    #[arg(
        long,
        env = "PAWFECT_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis server's certificate, for rediss:// URLs
    /// (default: the public web roots).
    #[arg(long, env = "PAWFECT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Prefix of every queue key (operator and workers must agree).
    #[arg(long, env = "PAWFECT_QUEUE_PREFIX", default_value = "pawfect")]
    pub queue_prefix: String,
    /// Only watch this namespace (all namespaces when unset).
    #[arg(long, env = "PAWFECT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the HTTP endpoints /metrics, /healthz, /readyz.
    #[arg(long, env = "PAWFECT_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `info,pawfect_operator=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format; the worker pods get the same (PAWFECT_LOG_FORMAT, unless the pool's env sets it).
    #[arg(long, env = "PAWFECT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Elect a leader through the Lease --lease-name (for more than one replica).
    #[arg(long, env = "PAWFECT_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "PAWFECT_LEASE_NAME", default_value = LEASE_NAME)]
    pub lease_name: String,
    /// Let pools mount their models from a hostPath (`spec.worker.modelVolume.hostPath`). Off:
    /// such a pool gets no workers, its Ready condition says why (HostPathNotAllowed) and a
    /// Warning Event is published on it. A hostPath volume reads the node's files, so only a
    /// cluster whose pool authors may do that should turn this on.
    #[arg(long, env = "PAWFECT_ALLOW_HOST_PATH_MODELS")]
    pub allow_host_path_models: bool,
    /// Job reconciles run at once. A reconcile mostly waits on the API server (its status
    /// write), so the job rate the operator keeps up with is this ÷ the reconcile duration ÷ 3
    /// (reconciles per job): raise it when `pawfect_operator_reconcile_queue_wait_seconds`
    /// grows while the API server has room.
    #[arg(long, env = "PAWFECT_JOB_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub job_concurrency: u16,
    /// Namespace of the Lease (default: POD_NAMESPACE, else --namespace, else the client's namespace).
    #[arg(long, env = "PAWFECT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Redis URL the worker pods get as PAWFECT_REDIS_URL (default: --redis-url without its password).
    #[arg(long, env = "PAWFECT_WORKER_REDIS_URL", hide_env_values = true)]
    pub worker_redis_url: Option<String>,
    /// Secret (in each pool's namespace) whose key holds the Redis password, injected into
    /// the workers as PAWFECT_REDIS_PASSWORD.
    #[arg(long, env = "PAWFECT_WORKER_REDIS_SECRET")]
    pub worker_redis_secret: Option<String>,
    /// Key of the password in --worker-redis-secret.
    #[arg(
        long,
        env = "PAWFECT_WORKER_REDIS_SECRET_KEY",
        default_value = "redis-password"
    )]
    pub worker_redis_secret_key: String,
    /// Give each pool's workers a Redis user of their own, limited to the pool's keys, with its
    /// password in the Secret `<pool>-redis-user` of the pool's namespace (instead of the
    /// shared password of --worker-redis-secret). Needs an admin Redis user (ACL SETUSER).
    #[arg(long, env = "PAWFECT_POOL_REDIS_USERS")]
    pub pool_redis_users: bool,
    /// ConfigMap (in each pool's namespace) holding the Redis CA the workers trust, mounted into
    /// them as PAWFECT_REDIS_CA_FILE (key --worker-redis-ca-key).
    #[arg(
        long,
        env = "PAWFECT_WORKER_REDIS_CA_CONFIGMAP",
        conflicts_with = "worker_redis_ca_secret"
    )]
    pub worker_redis_ca_configmap: Option<String>,
    /// Secret (in each pool's namespace) holding the Redis CA, instead of a ConfigMap.
    #[arg(long, env = "PAWFECT_WORKER_REDIS_CA_SECRET")]
    pub worker_redis_ca_secret: Option<String>,
    /// Key of the CA's PEM in --worker-redis-ca-configmap / --worker-redis-ca-secret.
    #[arg(long, env = "PAWFECT_WORKER_REDIS_CA_KEY", default_value = "ca.crt")]
    pub worker_redis_ca_key: String,
    /// ConfigMap (in the operator's namespace) whose `pool.json` holds an InpaintPool manifest to
    /// apply once this replica leads: the Helm chart's default pool (see `default_pool`).
    #[arg(long, env = "PAWFECT_DEFAULT_POOL_CONFIGMAP")]
    pub default_pool_configmap: Option<String>,
}

/// The Redis URLs of the operator and of the workers.
#[derive(Debug, PartialEq, Eq)]
pub struct RedisUrls {
    /// The operator's URL, with the password (if any).
    pub operator: String,
    /// What the workers get (never with the operator's password).
    pub worker: String,
    /// Whether the operator's URL has a password.
    pub has_password: bool,
}

/// Builds the operator's and the workers' Redis URLs from the flags and `PAWFECT_REDIS_PASSWORD`.
pub fn redis_urls(
    redis_url: &str,
    password: Option<&str>,
    worker_url: Option<&str>,
) -> anyhow::Result<RedisUrls> {
    let mut url = url::Url::parse(redis_url).context("--redis-url is not a URL")?;
    if !matches!(url.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
        bail!(
            "--redis-url must be redis://, rediss:// or redis+unix://, not {}://",
            url.scheme()
        );
    }
    if let Some(pw) = password.filter(|p| !p.is_empty()) {
        url.set_password(Some(pw))
            .map_err(|()| anyhow::anyhow!("cannot put a password into --redis-url (no host)"))?;
    }
    let has_password = url.password().is_some();
    let worker = match worker_url {
        Some(w) => {
            let w = url::Url::parse(w).context("--worker-redis-url is not a URL")?;
            w.to_string()
        }
        None => {
            let mut w = url.clone();
            // Fails only for URLs without a host, which cannot hold a password anyway.
            let _ = w.set_password(None);
            w.to_string()
        }
    };
    Ok(RedisUrls {
        operator: url.to_string(),
        worker,
        has_password,
    })
}

/// The operator's queue client settings (`run` and `check` alike).
pub fn queue_config(
    url: String,
    ca_file: Option<std::path::PathBuf>,
    prefix: String,
) -> QueueConfig {
    QueueConfig {
        url,
        ca_file,
        prefix,
        ..QueueConfig::default()
    }
}

/// Where the workers find the Redis CA (the `--worker-redis-ca-*` flags).
pub fn worker_ca(args: &RunArgs) -> Option<CaSource> {
    let key = args.worker_redis_ca_key.clone();
    match (
        &args.worker_redis_ca_configmap,
        &args.worker_redis_ca_secret,
    ) {
        (Some(name), _) => Some(CaSource::ConfigMap {
            name: name.clone(),
            key,
        }),
        (None, Some(name)) => Some(CaSource::Secret {
            name: name.clone(),
            key,
        }),
        (None, None) => None,
    }
}

/// Sets up logging.
pub fn init_tracing(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let res = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Why the operator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the {kind} CRD ({crd}) is not installed in this cluster: install it with \
         `kubectl apply -f crds/` (or the Helm chart), then restart the operator"
    )]
    CrdMissing {
        kind: &'static str,
        crd: &'static str,
    },
    #[error(
        "the operator may not list {plural} ({scope}): check its RBAC (ClusterRole/Role) — {source}"
    )]
    Forbidden {
        plural: &'static str,
        scope: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot list {plural}: {source}")]
    Api {
        plural: &'static str,
        #[source]
        source: kube::Error,
    },
}

async fn check_crd<K>(
    api: Api<K>,
    kind: &'static str,
    plural: &'static str,
    crd: &'static str,
    scope: &str,
) -> Result<(), StartError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Err(StartError::CrdMissing { kind, crd }),
        Err(e @ kube::Error::Api(_)) if matches!(&e, kube::Error::Api(s) if s.is_forbidden()) => {
            Err(StartError::Forbidden {
                plural,
                scope: scope.to_string(),
                source: e,
            })
        }
        Err(source) => Err(StartError::Api { plural, source }),
    }
}

/// Checks that both CRDs are installed and listable in the watched scope.
pub async fn check_crds(client: &Client, namespace: Option<&str>) -> Result<(), StartError> {
    let scope = namespace.map_or("all namespaces".to_string(), |n| format!("namespace {n}"));
    check_crd(
        scoped::<InpaintJob>(client, namespace),
        "InpaintJob",
        "inpaintjobs",
        "inpaintjobs.inpaint.pawfect.dev",
        &scope,
    )
    .await?;
    check_crd(
        scoped::<InpaintPool>(client, namespace),
        "InpaintPool",
        "inpaintpools",
        "inpaintpools.inpaint.pawfect.dev",
        &scope,
    )
    .await
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty() && !s.contains(':') && !s.contains(char::is_whitespace))
        .unwrap_or_else(|| format!("pawfect-operator-{}", std::process::id()))
}

/// Waits until this replica holds the Lease; the returned future resolves when it loses it.
async fn acquire_leadership(
    client: &Client,
    lease: &str,
    namespace: &str,
    identity: &str,
) -> anyhow::Result<impl Future<Output = ()> + use<>> {
    let manager = LeaseManagerBuilder::new(client.clone(), lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .build()
        .await
        .context("cannot set up leader election")?;
    let (mut rx, _task) = manager.watch().await;
    info!(%lease, %namespace, %identity, "waiting for leadership");
    while !*rx.borrow_and_update() {
        rx.changed()
            .await
            .context("leader election stopped before this replica became leader")?;
    }
    info!(%identity, "became leader");
    Ok(async move {
        loop {
            if rx.changed().await.is_err() || !*rx.borrow_and_update() {
                return;
            }
        }
    })
}

/// Applies the default pool from its ConfigMap; a failure is logged and reported on the ConfigMap
/// (the other pools keep running).
async fn apply_default_pool(ctx: &Context, namespace: &str, configmap: &str) {
    match default_pool::apply(&ctx.client, namespace, configmap).await {
        Ok(pool) => info!(
            pool = %pool.name_any(),
            %namespace,
            %configmap,
            "default pool applied"
        ),
        Err(e) => {
            error!(%e, "default pool not applied");
            let event = kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Warning,
                reason: "DefaultPoolRejected".into(),
                note: Some(e.to_string().chars().take(1024).collect()),
                action: "ApplyDefaultPool".into(),
                secondary: None,
            };
            let cm = default_pool::config_map_ref(namespace, configmap);
            if let Err(e) = ctx.recorder.publish(&event, &cm).await {
                warn!(%e, "cannot publish the default pool's event");
            }
        }
    }
}

/// What a pool's Ready condition says: `Ok` when it is `True`, else why not.
pub fn pool_ready(pool: Option<&InpaintPool>) -> Result<String, String> {
    let pool = pool.ok_or("the pool does not exist")?;
    let ready = pool
        .status
        .as_ref()
        .and_then(|s| s.condition(pawfect_api::conditions::READY))
        .ok_or("the pool has no Ready condition yet (is the operator running?)")?;
    let text = format!(
        "Ready={} ({}): {}",
        ready.status, ready.reason, ready.message
    );
    if ready.status == "True" {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `pawfect-operator check`: PING through the queue's own client, then the pool's Ready
/// condition until it is `True` or `--timeout` passes. Prints what it saw.
pub async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let password = std::env::var("PAWFECT_REDIS_PASSWORD").ok();
    let urls = redis_urls(&args.redis_url, password.as_deref(), None)?;
    let queue = Queue::connect(queue_config(
        urls.operator,
        args.redis_ca_file.clone(),
        QueueConfig::default().prefix,
    ))
    .await
    .with_context(|| format!("cannot connect to Redis at {}", urls.worker))?;
    queue
        .ping()
        .await
        .with_context(|| format!("Redis at {} does not answer PING", urls.worker))?;
    println!("redis {}: PONG", urls.worker);
    let Some(pool) = &args.pool else {
        return Ok(());
    };
    let (ns, name) = crate::split_queue_pool(pool)
        .with_context(|| format!("--pool {pool:?} is not namespace/name"))?;
    let client = Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let api: Api<InpaintPool> = Api::namespaced(client, ns);
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let seen = api
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read InpaintPool {pool}"))?;
        match pool_ready(seen.as_ref()) {
            Ok(text) => {
                println!("InpaintPool {pool}: {text}");
                return Ok(());
            }
            Err(why) if tokio::time::Instant::now() >= deadline => {
                bail!(
                    "InpaintPool {pool} is not Ready after {:?}: {why}",
                    args.timeout
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Runs the operator until SIGTERM/SIGINT (or the loss of leadership, which is an error so
/// that the pod restarts as a standby).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let password = std::env::var("PAWFECT_REDIS_PASSWORD").ok();
    let urls = redis_urls(
        &args.redis_url,
        password.as_deref(),
        args.worker_redis_url.as_deref(),
    )?;
    if urls.has_password && args.worker_redis_secret.is_none() && !args.pool_redis_users {
        warn!(
            "Redis needs a password but --worker-redis-secret is not set: worker pods get no password"
        );
    }
    let worker = WorkerConnection {
        redis_url: urls.worker.clone(),
        password_secret: args.worker_redis_secret.clone().map(|name| SecretKeyRef {
            name,
            key: args.worker_redis_secret_key.clone(),
        }),
        queue_prefix: args.queue_prefix.clone(),
        ca: worker_ca(&args),
    };

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let http_state = HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let addr = args.http_addr;
    let http_task = tokio::spawn(async move {
        if let Err(e) = http::serve(addr, http_state).await {
            error!(%addr, %e, "HTTP server failed");
        }
    });

    let client = Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let namespace = args.namespace.as_deref();
    check_crds(&client, namespace).await?;
    info!(
        scope = namespace.unwrap_or("all namespaces"),
        "CRDs installed"
    );

    let queue = Queue::connect(queue_config(
        urls.operator.clone(),
        args.redis_ca_file.clone(),
        args.queue_prefix.clone(),
    ))
    .await
    .context("cannot connect to Redis (--redis-url)")?;
    queue.ping().await.context("Redis does not answer PING")?;
    info!(prefix = %args.queue_prefix, "queue connected");
    // Keys of the layout before pools had their own prefix: nothing reads them any more (the
    // unfinished InpaintJobs are queued again under the new layout, from their resources).
    match queue.legacy_keys(100_000).await {
        Ok(0) => {}
        Ok(n) => warn!(
            keys = n,
            prefix = %args.queue_prefix,
            "Redis holds keys of the old queue layout ({p}:job:*, {p}:jobs:*, {p}:events, \
             {p}:dead:*, {p}:workers:*, {p}:server): unfinished jobs are queued again under \
             the per-pool layout; delete those keys once no worker of the old version runs",
            p = args.queue_prefix
        ),
        Err(e) => warn!(%e, "cannot look for keys of the old queue layout"),
    }
    ready.store(true, Ordering::Relaxed);

    let me = identity();
    // The operator's own namespace: where its Lease and the default pool's ConfigMap are.
    let own_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| client.default_namespace().to_string());
    let leadership_lost: futures::future::BoxFuture<'static, ()> = if args.leader_election {
        let lease_ns = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| own_namespace.clone());
        Box::pin(acquire_leadership(&client, &args.lease_name, &lease_ns, &me).await?)
    } else {
        Box::pin(futures::future::pending())
    };

    let (job_tx, job_rx) = futures::channel::mpsc::unbounded::<ObjectRef<InpaintJob>>();
    let (pool_tx, pool_rx) = futures::channel::mpsc::unbounded::<ObjectRef<InpaintPool>>();
    let mut ctx = Context::new(
        client.clone(),
        queue.clone(),
        metrics.clone(),
        worker,
        Some(me.clone()),
    );
    ctx.pool_wake = Some(pool_tx.clone());
    let (pool_store, pool_writer) = reflector::store();
    ctx.pools = Some(pool_store.clone());
    ctx.worker_log_format = Some(args.log_format.as_str());
    ctx.allow_host_path_models = args.allow_host_path_models;
    ctx.pool_redis_users = args.pool_redis_users;
    if args.allow_host_path_models {
        warn!("--allow-host-path-models: pools may mount node directories into their workers");
    }
    let ctx = Arc::new(ctx);
    if let Some(cm) = &args.default_pool_configmap {
        apply_default_pool(&ctx, &own_namespace, cm).await;
    }

    let jobs_api: Api<InpaintJob> = scoped(&client, namespace);
    let pools_api: Api<InpaintPool> = scoped(&client, namespace);
    let deploys_api: Api<Deployment> = scoped(&client, namespace);

    // The controllers' triggers go through the backlogs (reconcile queue depth metrics): the
    // jobs' own watch, the pools' watch mapped to waiting jobs, and the queue's wake-ups.
    let (job_store, job_writer) = reflector::store();
    let job_backlog = ctx.job_backlog.clone();
    let job_watch = reflector::reflector(
        job_writer,
        watcher(jobs_api, watcher::Config::default().any_semantic()),
    )
    .applied_objects()
    .predicate_filter(job::trigger, Default::default())
    .inspect(move |j| {
        if let Ok(j) = j {
            job_backlog.mark(&ObjectRef::from_obj(j));
        }
    });
    let jobs = job_store.clone();
    let (mapped_backlog, queue_backlog) = (ctx.job_backlog.clone(), ctx.job_backlog.clone());
    let job_controller = Controller::for_stream(job_watch, job_store)
        // A pool that appears (or changes) wakes the jobs that wait for it.
        .watches(
            pools_api.clone(),
            watcher::Config::default(),
            move |p: InpaintPool| {
                let all = jobs.state();
                let woken = job::waiting_for_pool(&p, all.iter().map(|j| j.as_ref()));
                for j in &woken {
                    mapped_backlog.mark(j);
                }
                woken
            },
        )
        .reconcile_on(job_rx.inspect(move |j| queue_backlog.mark(j)))
        .with_config(
            controller::Config::default()
                .debounce(Duration::from_millis(200))
                .concurrency(args.job_concurrency),
        )
        .shutdown_on_signal()
        .run(job::reconcile, job::error_policy, ctx.clone())
        .for_each(|r| {
            ctx.job_backlog.settle(&r);
            std::future::ready(())
        });

    let pool_backlog = ctx.pool_backlog.clone();
    let pool_watch = reflector::reflector(
        pool_writer,
        watcher(pools_api, watcher::Config::default().any_semantic()),
    )
    .applied_objects()
    .inspect(move |p| {
        if let Ok(p) = p {
            pool_backlog.mark(&ObjectRef::from_obj(p));
        }
    });
    let (owned_backlog, wake_backlog) = (ctx.pool_backlog.clone(), ctx.pool_backlog.clone());
    let pool_controller = Controller::for_stream(pool_watch, pool_store)
        .watches(
            deploys_api,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=pawfect-operator"),
            move |d: Deployment| {
                // What `owns` does: the InpaintPools named in the Deployment's owner references.
                let ns = d.namespace();
                let owners: Vec<ObjectRef<InpaintPool>> = d
                    .owner_references()
                    .iter()
                    .filter_map(|o| ObjectRef::from_owner_ref(ns.as_deref(), o, ()))
                    .collect();
                for r in &owners {
                    owned_backlog.mark(r);
                }
                owners
            },
        )
        .reconcile_on(pool_rx.inspect(move |p| wake_backlog.mark(p)))
        .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
        .shutdown_on_signal()
        .run(pool::reconcile, pool::error_policy, ctx.clone())
        .for_each(|r| {
            ctx.pool_backlog.settle(&r);
            std::future::ready(())
        });

    let events_metrics = metrics.clone();
    let events_task = tokio::spawn(async move {
        let triggers = Triggers {
            jobs: job_tx,
            pools: pool_tx,
        };
        events::run(queue, me, triggers, &events_metrics, Duration::from_secs(5)).await;
    });

    // The users of deleted pools (a pool's Secret goes by garbage collection, its Redis user
    // here), once a minute while this replica leads.
    let sweep_task = args.pool_redis_users.then(|| {
        let ctx = ctx.clone();
        let namespace = args.namespace.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if let Err(e) = crate::pool_user::sweep(&ctx, namespace.as_deref()).await {
                    warn!(%e, "cannot sweep the Redis users of deleted pools");
                }
            }
        })
    });

    info!("controllers started");
    let result = tokio::select! {
        _ = futures::future::join(job_controller, pool_controller) => {
            info!("controllers stopped");
            Ok(())
        }
        _ = leadership_lost => Err(anyhow::anyhow!("lost the leader lease; exiting so a standby takes over")),
    };
    events_task.abort();
    if let Some(t) = sweep_task {
        t.abort();
    }
    http_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn redis_url_password_handling() {
        let u = redis_urls("redis://redis:6379/0", None, None).unwrap();
        assert_eq!(u.operator, "redis://redis:6379/0");
        assert_eq!(u.worker, "redis://redis:6379/0");
        assert!(!u.has_password);

        let u = redis_urls("redis://:s3cret@redis:6379", None, None).unwrap();
        assert_eq!(u.operator, "redis://:s3cret@redis:6379");
        assert_eq!(u.worker, "redis://redis:6379");
        assert!(u.has_password);

        // PAWFECT_REDIS_PASSWORD overrides (and is URL-encoded).
        let u = redis_urls("rediss://default:old@redis:6380", Some("n@w/pw"), None).unwrap();
        assert_eq!(u.operator, "rediss://default:n%40w%2Fpw@redis:6380");
        assert_eq!(u.worker, "rediss://default@redis:6380");

        let u = redis_urls(
            "redis://:pw@redis:6379",
            None,
            Some("redis://redis-proxy:6379"),
        )
        .unwrap();
        assert_eq!(u.worker, "redis://redis-proxy:6379");

        assert!(redis_urls("http://redis", None, None).is_err());
        assert!(redis_urls("not a url", None, None).is_err());
    }

    #[test]
    fn cli_contract() {
        let cli = Cli::try_parse_from([
            "pawfect-operator",
            "run",
            "--redis-url",
            "redis://r:6379",
            "--queue-prefix",
            "pi",
            "--namespace",
            "media",
            "--http-addr",
            "127.0.0.1:9090",
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "--leader-election",
            "--worker-redis-url",
            "redis://w:6379",
            "--worker-redis-secret",
            "redis-auth",
            "--worker-redis-secret-key",
            "password",
            "--default-pool-configmap",
            "pi-default-pool",
            "--lease-name",
            "pi-operator",
            "--allow-host-path-models",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.redis_url, "redis://r:6379");
        assert_eq!(a.queue_prefix, "pi");
        assert_eq!(a.namespace.as_deref(), Some("media"));
        assert_eq!(a.http_addr.port(), 9090);
        assert_eq!(a.log_level, "debug");
        assert_eq!(a.log_format, LogFormat::Json);
        assert!(a.leader_election);
        assert_eq!(a.worker_redis_url.as_deref(), Some("redis://w:6379"));
        assert_eq!(a.worker_redis_secret.as_deref(), Some("redis-auth"));
        assert_eq!(a.worker_redis_secret_key, "password");
        assert_eq!(a.default_pool_configmap.as_deref(), Some("pi-default-pool"));
        assert_eq!(a.lease_name, "pi-operator");
        assert!(a.allow_host_path_models);
        assert_eq!(a.log_format.as_str(), "json");
    }

    #[test]
    fn job_concurrency_is_at_least_one() {
        let parse = |v: &str| {
            Cli::try_parse_from(["pawfect-operator", "run", "--job-concurrency", v]).map(|c| {
                let Command::Run(a) = c.command else {
                    panic!("not run")
                };
                a.job_concurrency
            })
        };
        assert_eq!(parse("128").unwrap(), 128);
        assert!(parse("0").is_err());
        assert!(parse("70000").is_err());
    }

    #[test]
    fn defaults_keep_the_lease_name_and_refuse_host_paths() {
        let Command::Run(a) = Cli::try_parse_from(["pawfect-operator", "run"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert_eq!(a.lease_name, LEASE_NAME);
        assert!(!a.allow_host_path_models);
        assert_eq!(a.job_concurrency, 32);
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(LogFormat::Text.as_str(), "text");
    }

    #[test]
    fn check_reads_the_pool_ready_condition() {
        let cli = Cli::try_parse_from([
            "pawfect-operator",
            "check",
            "--redis-url",
            "redis://r:6379/0",
            "--pool",
            "pawfect/default",
            "--timeout",
            "90s",
        ])
        .unwrap();
        let Command::Check(a) = cli.command else {
            panic!("not check")
        };
        assert_eq!(a.pool.as_deref(), Some("pawfect/default"));
        assert_eq!(a.timeout, Duration::from_secs(90));
        assert!(
            Cli::try_parse_from([
                "pawfect-operator",
                "check",
                "--redis-url",
                "redis://r",
                "--timeout",
                "soon"
            ])
            .is_err()
        );

        let mut pool = InpaintPool::new(
            "default",
            serde_json::from_value(serde_json::json!({"worker": {"image": "w:1"}})).unwrap(),
        );
        assert_eq!(pool_ready(None).unwrap_err(), "the pool does not exist");
        assert!(
            pool_ready(Some(&pool))
                .unwrap_err()
                .contains("no Ready condition")
        );
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH);
        let mut status = pawfect_api::InpaintPoolStatus::default();
        status.set_condition(
            pawfect_api::conditions::READY,
            pawfect_api::conditions::ConditionStatus::False,
            "QueueUnavailable",
            "cannot read the queue",
            None,
            now.clone(),
        );
        pool.status = Some(status.clone());
        let err = pool_ready(Some(&pool)).unwrap_err();
        assert!(err.contains("Ready=False (QueueUnavailable)"), "{err}");
        status.set_condition(
            pawfect_api::conditions::READY,
            pawfect_api::conditions::ConditionStatus::True,
            "DeploymentApplied",
            "applied",
            None,
            now,
        );
        pool.status = Some(status);
        assert!(pool_ready(Some(&pool)).unwrap().starts_with("Ready=True"));
    }
}
