//! Storage: file:// confinement and atomic writes, http(s) limits, scheme handling, and the
//! address policy of http(s) reads (loopback, metadata, private addresses, redirects).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::http::{Route, Server};
use pawfect_worker::pipeline::{FailureReason, PipelineError};
use pawfect_worker::storage::{HttpPolicy, Storage, StorageConfig, StorageError};

struct Dirs {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    Dirs {
        root: root.canonicalize().unwrap(),
        outside: outside.canonicalize().unwrap(),
        _tmp: tmp,
    }
}

/// Plain http to 127.0.0.1 allowed: the test servers listen there.
fn storage(roots: &[&std::path::Path]) -> Storage {
    with_policy(
        roots,
        HttpPolicy {
            allow_plain: true,
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            deny: Vec::new(),
        },
    )
}

fn with_policy(roots: &[&std::path::Path], http_policy: HttpPolicy) -> Storage {
    Storage::new(StorageConfig {
        allow_roots: roots.iter().map(|p| p.to_path_buf()).collect(),
        http_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(500),
        http_policy,
        ..StorageConfig::default()
    })
    .unwrap()
}

fn uri(p: &std::path::Path) -> String {
    format!("file://{}", p.display())
}

#[tokio::test]
async fn file_reads_are_confined_to_the_roots() {
    let d = dirs();
    std::fs::write(d.root.join("in.png"), b"inside").unwrap();
    std::fs::write(d.outside.join("secret.png"), b"outside").unwrap();
    std::os::unix::fs::symlink(d.outside.join("secret.png"), d.root.join("link.png")).unwrap();
    std::os::unix::fs::symlink(&d.outside, d.root.join("linkdir")).unwrap();
    let s = storage(&[&d.root]);

    assert_eq!(
        s.read(&uri(&d.root.join("in.png")), 100).await.unwrap(),
        Bytes::from_static(b"inside")
    );
    let dotdot = format!("file://{}/../outside/secret.png", d.root.display());
    let cases = [
        ("outside", uri(&d.outside.join("secret.png"))),
        ("dot-dot", dotdot),
        (
            "encoded dot-dot",
            format!("file://{}/%2e%2e/outside/secret.png", d.root.display()),
        ),
        ("symlink to a file outside", uri(&d.root.join("link.png"))),
        (
            "symlinked directory",
            uri(&d.root.join("linkdir/secret.png")),
        ),
        ("missing outside", uri(&d.outside.join("nope.png"))),
    ];
    for (name, u) in cases {
        let e = s.read(&u, 100).await.unwrap_err();
        assert!(
            matches!(e, StorageError::OutsideRoots { .. }),
            "{name}: {e}"
        );
    }
    let e = s
        .read(&uri(&d.root.join("nope.png")), 100)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e}");
    let e = s.read(&uri(&d.root), 100).await.unwrap_err();
    assert!(
        matches!(e, StorageError::NotFound { .. }),
        "a directory: {e}"
    );
    let e = s.read(&uri(&d.root.join("in.png")), 3).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { limit: 3, .. }), "{e}");
    let e = s
        .read("file://otherhost/etc/passwd", 100)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidUri { .. }), "{e}");

    // No roots: every file:// is refused, and the error says how to allow one.
    let none = storage(&[]);
    let e = none
        .read(&uri(&d.root.join("in.png")), 100)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--allow-root"), "{e}");
}

#[tokio::test]
async fn file_writes_are_atomic_and_confined() {
    let d = dirs();
    std::os::unix::fs::symlink(&d.outside, d.root.join("linkdir")).unwrap();
    std::fs::write(d.root.join("afile"), b"x").unwrap();
    let s = storage(&[&d.root]);

    let target = d.root.join("out/sub/result.png");
    s.check_writable(&uri(&target)).await.unwrap();
    s.write(&uri(&target), Bytes::from_static(b"first"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"first");
    s.write(&uri(&target), Bytes::from_static(b"second"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"second");
    let left: Vec<_> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        vec!["result.png".to_string()],
        "no temporary files left"
    );

    for (name, u) in [
        ("outside", uri(&d.outside.join("x.png"))),
        (
            "through a symlinked dir",
            uri(&d.root.join("linkdir/x.png")),
        ),
        (
            "dot-dot",
            format!("file://{}/../outside/x.png", d.root.display()),
        ),
    ] {
        let e = s.write(&u, Bytes::from_static(b"no")).await.unwrap_err();
        assert!(
            matches!(e, StorageError::OutsideRoots { .. }),
            "{name}: {e}"
        );
        let e = s.check_writable(&u).await.unwrap_err();
        assert!(
            matches!(e, StorageError::OutsideRoots { .. }),
            "{name}: {e}"
        );
    }
    assert!(
        std::fs::read_dir(&d.outside).unwrap().next().is_none(),
        "nothing written outside"
    );

    let under_file = uri(&d.root.join("afile/x.png"));
    let e = s.check_writable(&under_file).await.unwrap_err();
    assert!(matches!(e, StorageError::NotWritable { .. }), "{e}");
    let e = s
        .write(&under_file, Bytes::from_static(b"no"))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::NotWritable { .. }), "{e}");
    std::fs::create_dir(d.root.join("adir")).unwrap();
    let e = s
        .check_writable(&uri(&d.root.join("adir")))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StorageError::NotWritable { .. }),
        "a directory: {e}"
    );
}

#[tokio::test]
async fn schemes() {
    let s = storage(&[]);
    let cases = [
        ("ftp://host/x.png", "UnsupportedScheme"),
        ("data:image/png;base64,AAAA", "UnsupportedScheme"),
        ("not a uri", "InvalidUri"),
        ("/abs/path.png", "InvalidUri"),
        ("s3:///x.png", "InvalidUri"),
    ];
    for (u, want) in cases {
        let e = s.read(u, 10).await.unwrap_err();
        assert!(format!("{e:?}").starts_with(want), "{u}: {e:?}");
    }
    let e = s
        .write("https://example.com/x.png", Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ReadOnly { .. }), "{e}");
    let e = s
        .check_writable("http://example.com/x.png")
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ReadOnly { .. }), "{e}");
}

#[tokio::test]
async fn http_reads_with_limits() {
    let srv = Server::start().await;
    srv.route("/ok.png?sig=abc", Route::ok(b"hello".to_vec()));
    srv.route("/big.png", Route::ok(vec![7u8; 5000]));
    srv.route(
        "/big-unsized.png",
        Route {
            content_length: false,
            ..Route::ok(vec![7u8; 5000])
        },
    );
    srv.route(
        "/slow.png",
        Route {
            delay: Duration::from_secs(5),
            ..Route::ok(b"late".to_vec())
        },
    );
    srv.route("/500.png", Route::status(500));
    srv.route("/403.png", Route::status(403));
    let s = storage(&[]);

    assert_eq!(
        s.read(&srv.url("/ok.png?sig=abc"), 100).await.unwrap(),
        Bytes::from_static(b"hello")
    );
    assert_eq!(srv.hits("/ok.png?sig=abc"), 1, "query string kept");
    let e = s.read(&srv.url("/missing.png"), 100).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e}");
    for path in ["/big.png", "/big-unsized.png"] {
        let e = s.read(&srv.url(path), 1000).await.unwrap_err();
        assert!(
            matches!(e, StorageError::TooLarge { limit: 1000, .. }),
            "{path}: {e}"
        );
    }
    let e = s.read(&srv.url("/slow.png"), 100).await.unwrap_err();
    assert!(
        matches!(e, StorageError::Unreachable { .. }) && e.is_transient(),
        "{e}"
    );
    assert!(e.to_string().contains("timed out"), "{e}");
    let e = s.read(&srv.url("/500.png"), 100).await.unwrap_err();
    assert!(
        matches!(e, StorageError::HttpStatus { status: 500, .. }) && e.is_transient(),
        "{e}"
    );
    let e = s.read(&srv.url("/403.png"), 100).await.unwrap_err();
    assert!(
        matches!(e, StorageError::HttpStatus { status: 403, .. }) && !e.is_transient(),
        "{e}"
    );

    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = s
        .read(&format!("http://127.0.0.1:{port}/x.png"), 100)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Unreachable { .. }), "{e}");
}

/// What a refused read must look like: the reason, permanent, and nothing of the target's
/// answer in the message.
fn assert_refused(e: StorageError, uri: &str, reason: FailureReason, needle: &str) {
    let text = e.to_string();
    assert!(!e.is_transient(), "{uri}: {text}");
    assert!(text.contains(needle), "{uri}: {text}");
    for leak in [
        "internal secret",
        "403",
        "refused",
        "timed out",
        "HTTP status",
    ] {
        assert!(!text.contains(leak), "{uri}: {text} tells {leak:?}");
    }
    let failed = PipelineError::storage(e, "photo", false);
    assert_eq!(failed.reason, reason, "{uri}: {failed:?}");
    assert!(!failed.retryable, "{uri}: {failed:?}");
}

#[tokio::test]
async fn default_policy_refuses_loopback_metadata_and_plain_http() {
    let srv = Server::start().await;
    srv.route("/x.png", Route::ok(b"internal secret".to_vec()));
    srv.route("/forbidden.png", Route::status(403));
    let port = srv.addr.unwrap().port();
    let s = with_policy(&[], HttpPolicy::default());

    for uri in [
        format!("http://127.0.0.1:{port}/x.png"),
        format!("http://localhost:{port}/x.png"),
        "http://example.com/x.png".to_string(),
    ] {
        let e = s.read(&uri, 100).await.unwrap_err();
        assert!(
            matches!(e, StorageError::SchemeNotAllowed { .. }),
            "{uri}: {e}"
        );
        assert_refused(e, &uri, FailureReason::UnsupportedScheme, "plain http");
    }
    for uri in [
        format!("https://127.0.0.1:{port}/x.png"),
        format!("https://127.0.0.1:{port}/forbidden.png"),
        format!("https://[::1]:{port}/x.png"),
        format!("https://[::ffff:127.0.0.1]:{port}/x.png"),
        // Resolved by name: the resolver refuses what `localhost` resolves to.
        format!("https://localhost:{port}/x.png"),
        "https://169.254.169.254/latest/meta-data".to_string(),
        "https://10.0.0.1/x.png".to_string(),
        "https://[fd00::1]/x.png".to_string(),
    ] {
        let e = s.read(&uri, 100).await.unwrap_err();
        assert!(
            matches!(e, StorageError::AddressNotAllowed { .. }),
            "{uri}: {e}"
        );
        assert_eq!(e.to_string(), format!("{uri}: address not allowed"));
        assert_refused(
            e,
            &uri,
            FailureReason::AddressNotAllowed,
            "address not allowed",
        );
    }

    // Plain http allowed, loopback still refused, by literal and by name.
    let plain = with_policy(
        &[],
        HttpPolicy {
            allow_plain: true,
            ..HttpPolicy::default()
        },
    );
    for uri in [
        format!("http://127.0.0.1:{port}/x.png"),
        format!("http://127.0.0.1:{port}/forbidden.png"),
        format!("http://localhost:{port}/x.png"),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let e = plain.read(&uri, 100).await.unwrap_err();
        assert!(
            matches!(e, StorageError::AddressNotAllowed { .. }),
            "{uri}: {e}"
        );
        assert_refused(
            e,
            &uri,
            FailureReason::AddressNotAllowed,
            "address not allowed",
        );
    }
    assert_eq!(
        srv.hits("/x.png") + srv.hits("/forbidden.png"),
        0,
        "nothing reached the server"
    );

    // An allow CIDR opens its range, and only that: of what a name resolves to, the allowed
    // addresses are used.
    let allowed = storage(&[]);
    assert_eq!(
        allowed
            .read(&format!("http://localhost:{port}/x.png"), 100)
            .await
            .unwrap(),
        Bytes::from_static(b"internal secret"),
        "localhost resolves to 127.0.0.1 (allowed) and ::1 (refused): the allowed one is used"
    );
}

#[tokio::test]
async fn redirects_to_refused_addresses_are_refused() {
    // Two loopback hosts: only 127.0.0.2 is allowed, and it redirects to 127.0.0.1.
    let inner = Server::start().await;
    inner.route("/x.png", Route::ok(b"internal secret".to_vec()));
    let inner_port = inner.addr.unwrap().port();
    let outer = Server::start_on("127.0.0.2").await;
    let outer_base = format!("http://{}", outer.addr.unwrap());
    outer.route("/ok.png", Route::ok(b"fine".to_vec()));
    outer.route("/to-ok", Route::redirect(&format!("{outer_base}/ok.png")));
    outer.route(
        "/to-inner",
        Route::redirect(&format!("http://127.0.0.1:{inner_port}/x.png")),
    );
    outer.route(
        "/to-inner-by-name",
        Route::redirect(&format!("http://localhost:{inner_port}/x.png")),
    );
    outer.route(
        "/to-metadata",
        Route::redirect("http://169.254.169.254/latest/meta-data"),
    );
    outer.route(
        "/to-inner-twice",
        Route::redirect(&format!("{outer_base}/to-inner")),
    );
    outer.route("/loop", Route::redirect(&format!("{outer_base}/loop")));
    let s = with_policy(
        &[],
        HttpPolicy {
            allow_plain: true,
            allow: vec!["127.0.0.2/32".parse().unwrap()],
            deny: Vec::new(),
        },
    );

    assert_eq!(
        s.read(&format!("{outer_base}/to-ok"), 100).await.unwrap(),
        Bytes::from_static(b"fine"),
        "an allowed redirect is followed"
    );
    for path in [
        "/to-inner",
        "/to-inner-by-name",
        "/to-metadata",
        "/to-inner-twice",
    ] {
        let uri = format!("{outer_base}{path}");
        let e = s.read(&uri, 100).await.unwrap_err();
        assert!(
            matches!(e, StorageError::AddressNotAllowed { .. }),
            "{path}: {e}"
        );
        assert_eq!(e.to_string(), format!("{uri}: address not allowed"));
        assert_refused(
            e,
            &uri,
            FailureReason::AddressNotAllowed,
            "address not allowed",
        );
        assert_eq!(outer.hits(path), 1, "{path}: the allowed hop was asked");
    }
    assert_eq!(
        inner.hits("/x.png"),
        0,
        "the refused host was never reached"
    );

    let e = s
        .read(&format!("{outer_base}/loop"), 100)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("too many redirects"), "{e}");
    assert_eq!(outer.hits("/loop"), 6, "the first request and 5 redirects");
}

/// Create-only storage on the local file system: the first write lands, later ones (plain or
/// after the early check) are refused with `Exists`, and the first object stays.
#[tokio::test]
async fn create_only_file_writes_never_replace() {
    let d = dirs();
    let s = Storage::new(StorageConfig {
        allow_roots: vec![d.root.clone()],
        no_overwrite: true,
        ..StorageConfig::default()
    })
    .unwrap();
    let target = uri(&d.root.join("out/once.png"));
    s.check_writable(&target).await.unwrap();
    s.write(&target, Bytes::from_static(b"first"))
        .await
        .unwrap();
    let e = s.check_writable(&target).await.unwrap_err();
    assert!(matches!(e, StorageError::Exists { .. }), "{e}");
    let e = s
        .write(&target, Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Exists { .. }), "{e}");
    assert_eq!(
        PipelineError::storage(e, "output", true).reason,
        FailureReason::OutputExists
    );
    assert_eq!(
        std::fs::read(d.root.join("out/once.png")).unwrap(),
        b"first"
    );
    let left: Vec<_> = std::fs::read_dir(d.root.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["once.png"], "no temporary file left");
}

/// Object-store URIs outside the prefixes are refused before any client exists (so before
/// any request), and an output that names an input is refused however it is spelled.
#[tokio::test]
async fn prefixes_and_inputs_are_checked_before_anything_is_read() {
    let d = dirs();
    std::fs::write(d.root.join("in.png"), b"photo").unwrap();
    std::fs::write(d.root.join("m.png"), b"mask").unwrap();
    let s = Storage::new(StorageConfig {
        allow_roots: vec![d.root.clone()],
        allow_prefixes: vec!["s3://photos/in/".parse().unwrap()],
        ..StorageConfig::default()
    })
    .unwrap();
    for u in [
        "s3://photos-evil/in/x.png",
        "s3://photos/in-evil/x.png",
        "s3://photos/in/../x.png",
        "s3://photos/in/%2e%2e/x.png",
        "s3://photos/in//x.png",
        "gs://photos/in/x.png",
    ] {
        let e = s.read(u, 10).await.unwrap_err();
        assert!(
            matches!(e, StorageError::OutsidePrefixes { .. }),
            "{u}: {e}"
        );
        assert!(e.to_string().contains("(s3://photos/in/)"), "{e}");
        let e = s.write(u, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(e, StorageError::OutsidePrefixes { .. }),
            "{u}: {e}"
        );
    }
    let none = storage(&[]);
    let e = none.read("s3://photos/in/x.png", 10).await.unwrap_err();
    assert!(e.to_string().contains("allowedPrefixes"), "{e}");

    let photo = uri(&d.root.join("in.png"));
    let mask = uri(&d.root.join("m.png"));
    assert!(
        s.check_job(&photo, &mask, &uri(&d.root.join("out.png")))
            .is_ok()
    );
    for out in [
        photo.clone(),
        format!("file://{}/./sub/../in.png", d.root.display()),
        mask.clone(),
    ] {
        let (what, e) = s.check_job(&photo, &mask, &out).unwrap_err();
        assert_eq!(what, "output");
        assert!(
            matches!(e, StorageError::OverwritesInput { .. }),
            "{out}: {e}"
        );
    }
    let s3 = "s3://photos/in/dog.png";
    let (what, e) = s
        .check_job(s3, &mask, "s3a://photos/in/dog.png")
        .unwrap_err();
    assert_eq!(what, "output");
    assert!(e.to_string().contains("is the job's photo"), "{e}");
    let (what, e) = s.check_job(s3, &mask, "s3://other/x.png").unwrap_err();
    assert_eq!(what, "output");
    assert!(matches!(e, StorageError::OutsidePrefixes { .. }), "{e}");
}
