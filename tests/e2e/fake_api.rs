//! An in-memory Kubernetes API server double, served to a `kube::Client` through a tower-test
//! mock service (no network).
//!
//! It keeps objects as JSON in a map and answers exactly the REST calls the operator makes (see
//! the RBAC table of `operator/README.md`):
//!
//! | resource | calls |
//! |---|---|
//! | `inpaintjobs` | GET, JSON patch (finalizer), DELETE |
//! | `inpaintjobs/status` | server-side apply |
//! | `inpaintpools` | GET |
//! | `inpaintpools/status` | server-side apply |
//! | `apps/v1 deployments` | GET, server-side apply (creates when missing) |
//! | `pods` | LIST (label selector), merge patch |
//! | `events.k8s.io/v1 events` | POST, merge patch (event series) |
//!
//! Anything else is answered with an error status and recorded in [`FakeApi::unexpected`], which
//! the test asserts to be empty. The server keeps the semantics the operator relies on:
//! `metadata.resourceVersion` (one counter over all objects), `generation` (bumped when anything
//! but metadata and status changes), `uid`, `creationTimestamp`, finalizers that hold back a
//! deletion (the object goes once the last one is removed), JSON-patch `test` operations (a
//! missing path tests equal to `null`, as on a real API server), and status subresources that
//! change only the status.
//!
//! The test itself (playing kubectl, the kubelet and the Deployment controller) writes through
//! the methods of [`FakeApi`] directly; only the operator goes through HTTP requests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use serde_json::{Value, json};

/// A resource type the fake server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    Jobs,
    Pools,
    Deployments,
    Pods,
    Events,
}

impl Res {
    fn parse(group: &str, version: &str, plural: &str) -> Option<Res> {
        match (group, version, plural) {
            ("inpaint.pawfect.dev", "v1alpha1", "inpaintjobs") => Some(Res::Jobs),
            ("inpaint.pawfect.dev", "v1alpha1", "inpaintpools") => Some(Res::Pools),
            ("apps", "v1", "deployments") => Some(Res::Deployments),
            ("", "v1", "pods") => Some(Res::Pods),
            ("events.k8s.io", "v1", "events") => Some(Res::Events),
            _ => None,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Res::Jobs | Res::Pools => "inpaint.pawfect.dev/v1alpha1",
            Res::Deployments => "apps/v1",
            Res::Pods => "v1",
            Res::Events => "events.k8s.io/v1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Res::Jobs => "InpaintJob",
            Res::Pools => "InpaintPool",
            Res::Deployments => "Deployment",
            Res::Pods => "Pod",
            Res::Events => "Event",
        }
    }

    /// Whether `generation` is kept for this resource.
    fn has_generation(self) -> bool {
        matches!(self, Res::Jobs | Res::Pools | Res::Deployments)
    }
}

type Key = (Res, String, String);

/// A status written through the status subresource.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub res: Res,
    pub namespace: String,
    pub name: String,
    pub status: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every request the operator made: `METHOD path?query`.
    calls: Vec<String>,
    unexpected: Vec<String>,
    status_writes: Vec<StatusWrite>,
}

/// The fake API server (cheap to clone: shared state).
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status_body(code: StatusCode, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()
    })
}

fn now_time() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a timestamp serializes")
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

/// Everything but metadata and status (what `generation` tracks).
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("bad JSON pointer {path:?}"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// The parent container of `path` and the last token.
fn parent_mut<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let mut tokens = pointer_tokens(path)?;
    let last = tokens
        .pop()
        .ok_or_else(|| "a patch cannot replace the whole object".to_string())?;
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(&t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path {path:?} does not exist"))?;
    }
    Ok((cur, last))
}

/// RFC 6902 JSON patch (the operations kube's finalizer helper uses, and `replace`).
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or_else(|| "a JSON patch is an array".to_string())?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| "operation without a path".to_string())?;
        match op["op"].as_str() {
            Some("test") => {
                // A missing path tests equal to null (as the Kubernetes API server does).
                let actual = doc.pointer(path).cloned().unwrap_or(Value::Null);
                if actual != op["value"] {
                    return Err(format!(
                        "test of {path} failed: {actual} is not {}",
                        op["value"]
                    ));
                }
            }
            Some("add") => {
                let (parent, last) = parent_mut(doc, path)?;
                let value = op["value"].clone();
                match parent {
                    Value::Object(m) => {
                        m.insert(last, value);
                    }
                    Value::Array(a) if last == "-" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                        if i > a.len() {
                            return Err(format!("index out of range in {path}"));
                        }
                        a.insert(i, value);
                    }
                    _ => return Err(format!("cannot add at {path}")),
                }
            }
            Some("remove") => {
                let (parent, last) = parent_mut(doc, path)?;
                let removed = match parent {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err(format!("nothing to remove at {path}"));
                }
            }
            Some("replace") => {
                let slot = doc
                    .pointer_mut(path)
                    .ok_or_else(|| format!("nothing to replace at {path}"))?;
                *slot = op["value"].clone();
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// Equality-based label selector (`k=v,k2=v2`), the only form the operator uses.
fn selector_matches(selector: &str, obj: &Value) -> Result<bool, String> {
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once('=')
            .ok_or_else(|| format!("unsupported label selector term {term:?}"))?;
        if meta(obj)["labels"][k].as_str() != Some(v) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A parsed request path.
struct Target {
    res: Res,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let ["namespaces", ns, plural, tail @ ..] = rest else {
        return None;
    };
    let res = Res::parse(group, version, plural)?;
    let (name, sub) = match tail {
        [] => (None, None),
        [n] => (Some(n.to_string()), None),
        [n, s] => (Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        res,
        namespace: ns.to_string(),
        name,
        sub,
    })
}

type Reply = (StatusCode, Value);

impl FakeApi {
    /// A `kube::Client` whose requests this server answers (spawns the serving task).
    pub fn client(&self) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = match body.collect_bytes().await {
                    Ok(b) => b.to_vec(),
                    Err(e) => {
                        api.record_unexpected(format!("unreadable request body: {e}"));
                        Vec::new()
                    }
                };
                let (status, value) = api.handle(&parts, &bytes);
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(
                        serde_json::to_vec(&value).expect("JSON serializes"),
                    ))
                    .expect("a valid response");
                send.send_response(resp);
            }
        });
        kube::Client::new(svc, "default")
    }

    fn record_unexpected(&self, what: String) {
        eprintln!("fake API server: unexpected call: {what}");
        self.lock().unexpected.push(what);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls the server could not or would not answer (must stay empty).
    pub fn unexpected(&self) -> Vec<String> {
        self.lock().unexpected.clone()
    }

    /// Every request the operator made, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Every status written through a status subresource for `res` `ns/name`, in order.
    pub fn status_writes(&self, res: Res, ns: &str, name: &str) -> Vec<Value> {
        self.lock()
            .status_writes
            .iter()
            .filter(|w| w.res == res && w.namespace == ns && w.name == name)
            .map(|w| w.status.clone())
            .collect()
    }

    /// Creates an object (as `kubectl create` would): uid, resourceVersion, generation and
    /// creationTimestamp are set by the server. Panics when it exists.
    pub fn create(&self, res: Res, mut obj: Value) -> Value {
        let ns = meta(&obj)["namespace"]
            .as_str()
            .expect("namespaced")
            .to_string();
        let name = meta(&obj)["name"].as_str().expect("named").to_string();
        let mut st = self.lock();
        let key = (res, ns, name);
        assert!(!st.objects.contains_key(&key), "{key:?} exists");
        st.rv += 1;
        let rv = st.rv;
        let m = obj["metadata"].as_object_mut().expect("metadata");
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        m.insert("creationTimestamp".into(), now_time());
        if res.has_generation() {
            m.insert("generation".into(), json!(1));
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind());
        st.objects.insert(key, obj.clone());
        obj
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// A typed copy of an object.
    pub fn get_as<K: for<'de> k8s_openapi::serde::Deserialize<'de>>(
        &self,
        res: Res,
        ns: &str,
        name: &str,
    ) -> Option<K> {
        self.get(res, ns, name)
            .map(|v| serde_json::from_value(v).expect("stored objects are valid"))
    }

    /// All objects of a type.
    pub fn list(&self, res: Res) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == res)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Changes an object in place (as another controller would through the API): bumps its
    /// resourceVersion when `f` changed it. False when the object does not exist.
    pub fn update(&self, res: Res, ns: &str, name: &str, f: impl FnOnce(&mut Value)) -> bool {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let Some(obj) = st.objects.get_mut(&(res, ns.to_string(), name.to_string())) else {
            return false;
        };
        let before = obj.clone();
        f(obj);
        if *obj != before {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if res.has_generation() && spec_part(obj) != spec_part(&before) {
                let g = before["metadata"]["generation"].as_i64().unwrap_or(0);
                obj["metadata"]["generation"] = json!(g + 1);
            }
        }
        true
    }

    /// Removes an object at once (a pod whose containers exited).
    pub fn remove(&self, res: Res, ns: &str, name: &str) -> bool {
        self.lock()
            .objects
            .remove(&(res, ns.to_string(), name.to_string()))
            .is_some()
    }

    fn handle(&self, parts: &http::request::Parts, body: &[u8]) -> Reply {
        let method = parts.method.clone();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let call = format!("{method} {path}?{query}");
        self.lock().calls.push(call.clone());
        let params: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let ctype = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let reply = match parse_path(&path) {
            Some(t) => self.route(&method, &t, &params, &ctype, body),
            None => Err((
                StatusCode::NOT_FOUND,
                format!("the fake API server does not serve {path}"),
            )),
        };
        match reply {
            Ok(r) => r,
            Err((code, msg)) => {
                self.record_unexpected(format!("{call} [{ctype}]: {msg}"));
                let reason = if code == StatusCode::NOT_FOUND {
                    // Not "NotFound": an unserved path must not read as a missing object.
                    "UnexpectedCall"
                } else {
                    "InternalError"
                };
                (code, status_body(code, reason, msg))
            }
        }
    }

    /// Answers a served call; `Err` marks a call the operator should never make.
    fn route(
        &self,
        method: &Method,
        t: &Target,
        params: &BTreeMap<String, String>,
        ctype: &str,
        body: &[u8],
    ) -> Result<Reply, (StatusCode, String)> {
        let bad = |m: String| (StatusCode::INTERNAL_SERVER_ERROR, m);
        let body_json = || -> Result<Value, (StatusCode, String)> {
            serde_json::from_slice(body).map_err(|e| bad(format!("body is not JSON: {e}")))
        };
        let ns = t.namespace.as_str();
        match (method.as_str(), t.res, t.name.as_deref(), t.sub.as_deref()) {
            // Reads.
            ("GET", Res::Jobs | Res::Pools | Res::Deployments, Some(name), None) => {
                Ok(self.read(t.res, ns, name))
            }
            ("GET", Res::Pods, None, None) => {
                let selector = params.get("labelSelector").cloned().unwrap_or_default();
                let mut items = Vec::new();
                for o in self.list(Res::Pods) {
                    if meta(&o)["namespace"] == ns
                        && selector_matches(&selector, &o).map_err(bad)?
                    {
                        items.push(o);
                    }
                }
                let rv = self.lock().rv.to_string();
                Ok((
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "PodList",
                           "metadata": {"resourceVersion": rv}, "items": items}),
                ))
            }
            // Server-side apply.
            ("PATCH", Res::Jobs | Res::Pools, Some(name), Some("status"))
                if ctype == "application/apply-patch+yaml" =>
            {
                check_apply_params(params).map_err(bad)?;
                let body = body_json()?;
                check_kind(t.res, &body).map_err(bad)?;
                Ok(self.apply_status(t.res, ns, name, body))
            }
            ("PATCH", Res::Deployments, Some(name), None)
                if ctype == "application/apply-patch+yaml" =>
            {
                check_apply_params(params).map_err(bad)?;
                let body = body_json()?;
                check_kind(t.res, &body).map_err(bad)?;
                if meta(&body)["name"] != name {
                    return Err(bad(format!("applied object is not named {name}")));
                }
                Ok(self.apply_object(t.res, ns, name, body))
            }
            // Finalizers (kube's finalizer helper).
            ("PATCH", Res::Jobs, Some(name), None) if ctype == "application/json-patch+json" => {
                let ops = body_json()?;
                Ok(self.patch(t.res, ns, name, |obj| json_patch(obj, &ops)))
            }
            // Pod annotations, event series.
            ("PATCH", Res::Pods | Res::Events, Some(name), None)
                if ctype == "application/merge-patch+json" =>
            {
                let patch = body_json()?;
                if !patch["status"].is_null() {
                    return Err(bad(
                        "a merge patch of the main resource changes status".into()
                    ));
                }
                Ok(self.patch(t.res, ns, name, |obj| {
                    merge_patch(obj, &patch);
                    Ok(())
                }))
            }
            ("POST", Res::Events, None, None) => {
                let mut ev = body_json()?;
                check_kind(Res::Events, &ev).map_err(bad)?;
                if ev["metadata"]["namespace"].is_null() {
                    ev["metadata"]["namespace"] = json!(ns);
                }
                if ev["metadata"]["name"].is_null() {
                    let prefix = ev["metadata"]["generateName"].as_str().unwrap_or("event-");
                    let name = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
                    ev["metadata"]["name"] = json!(name);
                }
                Ok((StatusCode::CREATED, self.create(Res::Events, ev)))
            }
            ("DELETE", Res::Jobs, Some(name), None) => Ok(self.delete(t.res, ns, name)),
            _ => Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "not a call the operator makes".into(),
            )),
        }
    }

    fn not_found(res: Res, name: &str) -> Reply {
        (
            StatusCode::NOT_FOUND,
            status_body(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} {name:?} not found", res.kind()),
            ),
        )
    }

    fn read(&self, res: Res, ns: &str, name: &str) -> Reply {
        match self.get(res, ns, name) {
            Some(o) => (StatusCode::OK, o),
            None => Self::not_found(res, name),
        }
    }

    fn apply_status(&self, res: Res, ns: &str, name: &str, body: Value) -> Reply {
        let status = body["status"].clone();
        let found = self.update(res, ns, name, |obj| obj["status"] = status.clone());
        if !found {
            return Self::not_found(res, name);
        }
        self.lock().status_writes.push(StatusWrite {
            res,
            namespace: ns.into(),
            name: name.into(),
            status,
        });
        self.read(res, ns, name)
    }

    /// Server-side apply of a whole object by its only field manager: the applied fields
    /// replace the old ones; server-set metadata and the status stay.
    fn apply_object(&self, res: Res, ns: &str, name: &str, mut body: Value) -> Reply {
        body["metadata"]["namespace"] = json!(ns);
        if body.get("status").is_some_and(|s| !s.is_null()) {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                status_body(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "status is not applied through the main resource".into(),
                ),
            );
        }
        if self.get(res, ns, name).is_none() {
            return (StatusCode::CREATED, self.create(res, body));
        }
        self.update(res, ns, name, |obj| {
            let mut next = body.clone();
            for k in [
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
            ] {
                if let Some(v) = obj["metadata"].get(k) {
                    next["metadata"][k] = v.clone();
                }
            }
            if let Some(s) = obj.get("status") {
                next["status"] = s.clone();
            }
            *obj = next;
        });
        self.read(res, ns, name)
    }

    fn patch(
        &self,
        res: Res,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value) -> Result<(), String>,
    ) -> Reply {
        let Some(mut obj) = self.get(res, ns, name) else {
            return Self::not_found(res, name);
        };
        if let Err(e) = f(&mut obj) {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                status_body(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e),
            );
        }
        let gone = !obj["metadata"]["deletionTimestamp"].is_null()
            && obj["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        self.update(res, ns, name, |o| *o = obj);
        if gone {
            // The last finalizer went: the deletion completes.
            let last = self.get(res, ns, name);
            self.remove(res, ns, name);
            return (StatusCode::OK, last.unwrap_or(Value::Null));
        }
        self.read(res, ns, name)
    }

    fn delete(&self, res: Res, ns: &str, name: &str) -> Reply {
        let Some(obj) = self.get(res, ns, name) else {
            return Self::not_found(res, name);
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            self.update(res, ns, name, |o| {
                if o["metadata"]["deletionTimestamp"].is_null() {
                    o["metadata"]["deletionTimestamp"] = now_time();
                }
            });
            self.read(res, ns, name)
        } else {
            self.remove(res, ns, name);
            (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            )
        }
    }
}

fn check_apply_params(params: &BTreeMap<String, String>) -> Result<(), String> {
    if params.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err("server-side apply without a fieldManager".into());
    }
    Ok(())
}

fn check_kind(res: Res, body: &Value) -> Result<(), String> {
    if body["apiVersion"] != res.api_version() || body["kind"] != res.kind() {
        return Err(format!(
            "body is {} {}, not {} {}",
            body["apiVersion"],
            body["kind"],
            res.api_version(),
            res.kind()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patch_tests_missing_as_null_and_edits_lists() {
        let mut o = json!({"metadata": {"name": "a"}});
        let add = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}
        ]);
        json_patch(&mut o, &add).unwrap();
        assert_eq!(o["metadata"]["finalizers"], json!(["x"]));
        // The test fails now: the list is not null any more.
        assert!(json_patch(&mut o, &add).is_err());
        let rm = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "x"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]);
        json_patch(&mut o, &rm).unwrap();
        assert_eq!(o["metadata"]["finalizers"], json!([]));
        assert!(json_patch(&mut o, &rm).is_err());
    }

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut o = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut o,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(o["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
    }

    #[test]
    fn paths() {
        let t =
            parse_path("/apis/inpaint.pawfect.dev/v1alpha1/namespaces/pets/inpaintjobs/rex/status")
                .unwrap();
        assert_eq!(
            (
                t.res,
                t.namespace.as_str(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            (Res::Jobs, "pets", Some("rex"), Some("status"))
        );
        let t = parse_path("/api/v1/namespaces/pets/pods").unwrap();
        assert_eq!((t.res, t.name), (Res::Pods, None));
        assert!(parse_path("/api/v1/namespaces/pets/secrets/x").is_none());
        assert!(parse_path("/apis/coordination.k8s.io/v1/namespaces/pets/leases/x").is_none());
    }
}
