//! The queue over TLS against a real redis-server that serves TLS only (plaintext port off),
//! with a CA and server certificate generated here: a full round trip trusting the CA file,
//! and clear refusals without it, with another CA, and in plain text.

mod common;

use std::time::Duration;

use common::{all_events, config, count, job, spec};
use pawfect_api::StageTimings;
use pawfect_queue::testing::{RedisServer, TestCa};
use pawfect_queue::{EventKind, JobResult, JobState, Outcome, Queue, QueueConfig, QueueError};

fn tls_config(server: &RedisServer, ca: &TestCa) -> QueueConfig {
    QueueConfig {
        ca_file: Some(ca.ca_file()),
        ..config(&server.url(), 60_000)
    }
}

#[tokio::test]
async fn round_trip_over_tls_with_the_ca() {
    let ca = TestCa::generate().unwrap();
    let server = RedisServer::start_tls(&ca).unwrap();
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    let q = Queue::connect(tls_config(&server, &ca)).await.unwrap();
    q.ping().await.unwrap();

    let created = q
        .enqueue(&job("t1"), &spec("pets/default", "normal", 3))
        .await
        .unwrap();
    assert!(created.created);
    // The worker's blocking reads use a connection of their own: over TLS too.
    let mut w = q.worker("pets/default", "w1").await.unwrap();
    let c = w
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("claimed");
    assert_eq!(c.uid(), "t1");
    let done = c
        .complete(&JobResult {
            output: "file:///out/dog.png".into(),
            caption: None,
            prompt: Some("grass".into()),
            prompt_source: Some("prompt".into()),
            timings: StageTimings::default(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(done, Outcome::Finished(JobState::Succeeded));
    let rec = q.get_job("pets/default", "t1").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    let events = all_events(&q).await;
    assert_eq!(count(&events, "t1", EventKind::Claimed), 1);
    assert_eq!(count(&events, "t1", EventKind::Succeeded), 1);
}

#[tokio::test]
async fn refused_without_the_ca() {
    let ca = TestCa::generate().unwrap();
    let server = RedisServer::start_tls(&ca).unwrap();

    // No CA file: only the public roots are trusted, which never signed this server.
    let err = Queue::connect(config(&server.url(), 60_000))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, QueueError::Connect { .. }), "{err:?}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("Redis CA file"), "{text}");

    // Another CA: refused the same way, naming the file trusted.
    let other = TestCa::generate().unwrap();
    let err = Queue::connect(QueueConfig {
        ca_file: Some(other.ca_file()),
        ..config(&server.url(), 60_000)
    })
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(
        text.contains(&other.ca_file().display().to_string()),
        "{text}"
    );

    // Plain text to the TLS port gets no answer Redis would give.
    let plain = server.url().replacen("rediss://", "redis://", 1);
    let plain_cfg = QueueConfig {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        ..config(&plain, 60_000)
    };
    let refused = match Queue::connect(plain_cfg).await {
        Err(_) => true,
        Ok(q) => q.ping().await.is_err(),
    };
    assert!(refused, "a plaintext client was served by a TLS-only port");
}

#[tokio::test]
async fn a_ca_file_must_be_usable() {
    let ca = TestCa::generate().unwrap();
    // A CA for a plain redis:// URL is a configuration mistake, said before connecting.
    let err = Queue::connect(QueueConfig {
        ca_file: Some(ca.ca_file()),
        ..QueueConfig::new("redis://127.0.0.1:1/")
    })
    .await
    .unwrap_err();
    assert!(matches!(err, QueueError::CaFile { .. }), "{err:?}");
    assert!(err.to_string().contains("not a rediss:// URL"), "{err}");

    let missing = ca.ca_file().with_file_name("absent.crt");
    let err = Queue::connect(QueueConfig {
        ca_file: Some(missing.clone()),
        ..QueueConfig::new("rediss://127.0.0.1:1/")
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    // A key is no certificate.
    let err = Queue::connect(QueueConfig {
        ca_file: Some(ca.key_file()),
        ..QueueConfig::new("rediss://127.0.0.1:1/")
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}
