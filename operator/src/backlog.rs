//! Reconcile queue depth: how many objects wait for a reconcile, and for how long.
//!
//! kube-runtime's `Controller` keeps its scheduler to itself, so the operator tracks what goes
//! into it: every trigger (a watch event of the object, a mapped watch of a related object, a
//! wake-up from the queue's events stream) marks the object as waiting, and the start of its
//! reconcile clears the mark. The depth is the number of distinct objects marked — the
//! scheduler deduplicates triggers of one object, so this is the same count as controller-
//! runtime's `workqueue_depth`. The wait is measured from the *first* unserved trigger, which
//! is what a user waiting for a status sees. Requeues (`Action::requeue`) are timers, not
//! waiting work, and are not counted; an object whose reconcile never comes because it was
//! deleted is forgotten when the controller reports it missing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::Resource;
use kube::runtime::controller;
use kube::runtime::reflector::ObjectRef;

use crate::metrics::Metrics;

/// The objects of one controller that wait for their reconcile.
pub struct Backlog<K: Resource<DynamicType = ()>> {
    controller: &'static str,
    waiting: Mutex<HashMap<ObjectRef<K>, Instant>>,
    metrics: Arc<Metrics>,
}

impl<K: Resource<DynamicType = ()>> Backlog<K> {
    pub fn new(controller: &'static str, metrics: Arc<Metrics>) -> Self {
        metrics.reconcile_queue_depth(controller, 0);
        Backlog {
            controller,
            waiting: Mutex::default(),
            metrics,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<ObjectRef<K>, Instant>) -> R) -> R {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut w);
        self.metrics.reconcile_queue_depth(self.controller, w.len());
        r
    }

    /// A trigger for `obj` reached the controller (the earliest unserved one counts).
    pub fn mark(&self, obj: &ObjectRef<K>) {
        let now = Instant::now();
        self.with(|w| {
            w.entry(obj.clone()).or_insert(now);
        });
    }

    /// The reconcile of `obj` starts: it no longer waits. Records how long it waited.
    pub fn start(&self, obj: &ObjectRef<K>) {
        if let Some(since) = self.with(|w| w.remove(obj)) {
            self.metrics
                .reconcile_queue_wait(self.controller, since.elapsed().as_secs_f64());
        }
    }

    /// `obj` will not be reconciled (the controller found it gone).
    pub fn forget(&self, obj: &ObjectRef<K>) {
        self.with(|w| {
            w.remove(obj);
        });
    }

    /// `forget` for the type-erased reference a controller error carries.
    pub fn forget_named(&self, name: &str, namespace: Option<&str>) {
        let obj = ObjectRef::<K>::new(name);
        self.forget(&match namespace {
            Some(ns) => obj.within(ns),
            None => obj,
        });
    }

    /// What the controller reports after a reconcile: an object it found gone is forgotten,
    /// other failures (already counted by the error policy) are logged at debug level.
    pub fn settle<T, E1, E2>(&self, r: &Result<T, controller::Error<E1, E2>>)
    where
        E1: std::error::Error + 'static,
        E2: std::error::Error + 'static,
    {
        match r {
            Err(controller::Error::ObjectNotFound(gone)) => {
                self.forget_named(&gone.name, gone.namespace.as_deref())
            }
            Err(e) => tracing::debug!(%e, controller = self.controller, "controller"),
            Ok(_) => {}
        }
    }

    /// Objects waiting now.
    pub fn depth(&self) -> usize {
        self.with(|w| w.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pawfect_api::InpaintJob;

    #[test]
    fn depth_counts_distinct_objects_until_their_reconcile_starts() {
        let metrics = Arc::new(Metrics::default());
        let b = Backlog::<InpaintJob>::new("job", metrics.clone());
        let a: ObjectRef<InpaintJob> = ObjectRef::new("a").within("pets");
        let c: ObjectRef<InpaintJob> = ObjectRef::new("c").within("pets");
        let other_ns: ObjectRef<InpaintJob> = ObjectRef::new("a").within("media");
        b.mark(&a);
        b.mark(&a); // the scheduler runs one reconcile for both
        b.mark(&c);
        b.mark(&other_ns);
        assert_eq!(b.depth(), 3);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"pawfect_operator_reconcile_queue_depth{controller="job"} 3"#),
            "{text}"
        );
        b.start(&a);
        b.start(&a); // a requeued reconcile that no trigger asked for records no wait
        b.forget(&c);
        assert_eq!(b.depth(), 1);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"pawfect_operator_reconcile_queue_depth{controller="job"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pawfect_operator_reconcile_queue_wait_seconds_count{controller="job"} 1"#
            ),
            "{text}"
        );
        b.start(&other_ns);
        assert_eq!(b.depth(), 0);
    }
}
