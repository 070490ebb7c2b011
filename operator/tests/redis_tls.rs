//! The operator binary's queue client over TLS, against a real redis-server that serves TLS
//! only, its certificate signed by a CA generated here: `pawfect-operator check` (the same
//! client settings as `run`, `run::queue_config`) answers PONG with `--redis-ca-file`, and
//! without it fails naming the unknown issuer and the Redis CA file.

use std::process::{Command, Output};

use pawfect_queue::testing::{RedisServer, TestCa};

fn check(url: &str, ca: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pawfect-operator"));
    cmd.args(["check", "--redis-url", url])
        .env_remove("PAWFECT_REDIS_PASSWORD")
        .env_remove("PAWFECT_REDIS_CA_FILE");
    if let Some(ca) = ca {
        cmd.arg("--redis-ca-file").arg(ca);
    }
    cmd.output().expect("pawfect-operator runs")
}

#[test]
fn operator_connects_over_tls_with_the_ca_only() {
    let ca = TestCa::generate().unwrap();
    let redis = RedisServer::start_tls(&ca).unwrap();

    let ok = check(&redis.url(), Some(&ca.ca_file()));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("PONG"), "{stdout}");

    let refused = check(&redis.url(), None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(stderr.contains("Redis CA file"), "{stderr}");

    let other = TestCa::generate().unwrap();
    let refused = check(&redis.url(), Some(&other.ca_file()));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
}
