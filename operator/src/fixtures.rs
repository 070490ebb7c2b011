//! Test fixtures: a mock Kubernetes API server that checks each request (the `controller-rs`
//! `ApiServerVerifier` pattern on tower-test), a real `redis-server` for the queue, and
//! builders of InpaintJob/InpaintPool objects.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::{Client, Resource};
use pawfect_api::{InpaintJob, InpaintPool, JOB_FINALIZER};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{Queue, QueueConfig};
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use crate::Context;
use crate::deployment::WorkerConnection;
use crate::metrics::Metrics;

/// One request the code under test made.
#[derive(Debug)]
pub struct Call {
    pub method: Method,
    /// Path and query, e.g. `/apis/…/status?&force=true&fieldManager=pawfect-operator`.
    pub uri: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

/// The mock API server: answers requests in the order a test expects them.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// Waits for the next request (fails the test after 20 s).
    pub async fn next(&mut self) -> (Call, SendResponse<Response<Body>>) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(20), self.0.next_request())
            .await
            .expect("timed out waiting for an API request")
            .expect("the client is gone: no more requests");
        let method = req.method().clone();
        let uri = req
            .uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (Call { method, uri, body }, send)
    }

    /// Expects a request with this method and path-and-query, answers `status` + `reply`,
    /// and returns the request body.
    pub async fn expect(
        &mut self,
        method: Method,
        uri: &str,
        status: StatusCode,
        reply: Value,
    ) -> Value {
        let (call, send) = self.next().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&method, uri),
            "unexpected request (body {})",
            call.body
        );
        send.send_response(json_response(status, &reply));
        call.body
    }

    /// Expects a request and answers with `reply(body)`.
    pub async fn expect_with(
        &mut self,
        method: Method,
        uri: &str,
        reply: impl FnOnce(&Value) -> (StatusCode, Value),
    ) -> Value {
        let (call, send) = self.next().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&method, uri),
            "unexpected request (body {})",
            call.body
        );
        let (status, v) = reply(&call.body);
        send.send_response(json_response(status, &v));
        call.body
    }

    /// Expects an Event (events.k8s.io/v1) in `ns`: created, or patched when the same event
    /// repeats within the recorder's cache time (an event series). Returns it.
    pub async fn expect_event(&mut self, ns: &str) -> Value {
        let (call, send) = self.next().await;
        let base = format!("/apis/events.k8s.io/v1/namespaces/{ns}/events");
        let created = call.method == Method::POST && call.uri == format!("{base}?");
        let repeated = call.method == Method::PATCH
            && call.uri.starts_with(&format!("{base}/"))
            && call.body["series"]["count"].as_i64() >= Some(2);
        assert!(
            created || repeated,
            "expected an Event, got {} {} {}",
            call.method,
            call.uri,
            call.body
        );
        send.send_response(json_response(StatusCode::CREATED, &call.body));
        call.body
    }

    /// Asserts that no request arrives within a short time.
    pub async fn expect_silence(&mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

/// A Kubernetes `Status` 404 body.
pub fn not_found(kind: &str, name: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "kind": kind}, "code": 404
    })
}

/// Everything a reconcile test needs: the context (mock client + real queue), the mock API
/// server, and the Redis server (kept alive by the value).
pub struct TestEnv {
    pub ctx: Arc<Context>,
    pub api: ApiServerVerifier,
    pub queue: Queue,
    pub redis: RedisServer,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with_pool_users(false).await
    }

    /// With `--pool-redis-users` on or off.
    pub async fn with_pool_users(pool_redis_users: bool) -> TestEnv {
        let redis = RedisServer::start().expect("redis-server starts (is it installed?)");
        let queue = Queue::connect(QueueConfig {
            url: redis.url(),
            lease: Duration::from_secs(30),
            ..QueueConfig::default()
        })
        .await
        .expect("queue connects");
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let worker = WorkerConnection {
            redis_url: "redis://redis:6379/".into(),
            password_secret: None,
            ca: None,
            queue_prefix: "pawfect".into(),
        };
        let mut ctx = Context::new(
            client,
            queue.clone(),
            Arc::new(Metrics::default()),
            worker,
            Some("pawfect-operator-test".into()),
        );
        ctx.pool_redis_users = pool_redis_users;
        TestEnv {
            ctx: Arc::new(ctx),
            api: ApiServerVerifier(handle),
            queue,
            redis,
        }
    }
}

pub const NS: &str = "pets";
pub const JOB: &str = "rex";
pub const JOB_UID: &str = "0b5c2f7e-1d7a-4c59-9a57-6c1f1e0a7b11";
pub const POOL: &str = "t4";

/// A fresh InpaintJob `pets/rex` for pool `t4`, created `age_secs` ago.
pub fn job(age_secs: i64, extra_spec: Value) -> InpaintJob {
    let mut spec = json!({
        "image": "file:///data/rex.jpg", "mask": "file:///data/rex-mask.png",
        "output": "file:///data/rex-out.png", "pool": POOL
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    let mut j = InpaintJob::new(JOB, serde_json::from_value(spec).unwrap());
    j.metadata.namespace = Some(NS.into());
    j.metadata.uid = Some(JOB_UID.into());
    j.metadata.generation = Some(1);
    j.metadata.resource_version = Some("100".into());
    j.metadata.creation_timestamp = Some(Time(
        Timestamp::now() - jiff::SignedDuration::from_secs(age_secs),
    ));
    j
}

/// The job with the operator's finalizer.
pub fn finalized(mut j: InpaintJob) -> InpaintJob {
    j.metadata.finalizers = Some(vec![JOB_FINALIZER.into()]);
    j
}

/// The job marked for deletion.
pub fn deleting(mut j: InpaintJob) -> InpaintJob {
    j.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    j
}

/// The job as the API server returns it after a status apply (the applied status merged in).
pub fn with_status(j: &InpaintJob, patch: &Value) -> InpaintJob {
    let mut j = j.clone();
    j.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
    j
}

/// Path of a job.
pub fn job_path(name: &str) -> String {
    format!("/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{NS}/inpaintjobs/{name}")
}

/// The server-side-apply status URI of the operator.
pub fn status_uri<K: Resource<DynamicType = ()>>(ns: &str, name: &str) -> String {
    format!(
        "/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{ns}/{}/{name}/status?&force=true&fieldManager=pawfect-operator",
        K::plural(&())
    )
}

/// InpaintPool `ns/name`.
pub fn pool(ns: &str, name: &str, spec: Value) -> InpaintPool {
    let mut p = InpaintPool::new(name, serde_json::from_value(spec).unwrap());
    p.metadata.namespace = Some(ns.into());
    p.metadata.uid = Some(format!("uid-pool-{name}"));
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("7".into());
    p
}
