//! Job inputs on disk, the table of bad inputs, and waiting for jobs through the queue.

use std::path::{Path, PathBuf};
use std::time::Duration;

use image::{GrayImage, ImageEncoder, Luma, Rgb, RgbImage};
use pawfect_api::InpaintJobSpec;
use pawfect_queue::{Event, EventKind, JobRecord, JobRef, JobState, Queue, QueueConfig};

use super::http::{Route, Server};

/// The queue pool of the test workers and jobs.
pub const POOL: &str = "test";

/// Queue settings for tests: short lease, fast heartbeat and blocking reads.
pub fn queue_config(url: &str, lease: Duration) -> QueueConfig {
    QueueConfig {
        lease,
        heartbeat_interval: Some(lease / 5),
        block_interval: Duration::from_millis(200),
        ..QueueConfig::new(url)
    }
}

pub fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13) as u8;
        Rgb([v, v.wrapping_mul(3), 255 - v])
    })
}

/// A leash-like line and a blob.
pub fn leash_mask(w: u32, h: u32) -> GrayImage {
    let mut m = GrayImage::new(w, h);
    for x in w / 8..w * 7 / 8 {
        let y = h / 4 + (x - w / 8) * h / 2 / w;
        for dy in 0..3 {
            m.put_pixel(x, (y + dy).min(h - 1), Luma([255]));
        }
    }
    for y in h / 2..h / 2 + 8 {
        for x in w / 2..w / 2 + 8 {
            m.put_pixel(x, y, Luma([255]));
        }
    }
    m
}

pub fn png_rgb(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

pub fn png_gray(img: &GrayImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::L8,
        )
        .unwrap();
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small PNG whose header claims `w`×`h` pixels.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = png_rgb(&RgbImage::new(4, 4));
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// Input files of the tests, under one allowed root.
pub struct Inputs {
    pub root: PathBuf,
    pub outside: PathBuf,
    pub width: u32,
    pub height: u32,
}

pub const W: u32 = 96;
pub const H: u32 = 64;

impl Inputs {
    pub fn create(dir: &Path) -> Inputs {
        let root = dir.join("root");
        let outside = dir.join("outside");
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let root = root.canonicalize().unwrap();
        let outside = outside.canonicalize().unwrap();
        let write = |name: &str, bytes: Vec<u8>| std::fs::write(root.join(name), bytes).unwrap();
        let good = png_rgb(&photo(W, H));
        write("photo.png", good.clone());
        write("mask.png", png_gray(&leash_mask(W, H)));
        write("truncated.png", good[..good.len() / 2].to_vec());
        write("text.png", b"this is not an image at all".to_vec());
        write("mask-wrong-aspect.png", png_gray(&leash_mask(64, 64)));
        write("mask-empty.png", png_gray(&GrayImage::new(W, H)));
        write(
            "mask-white.png",
            png_gray(&GrayImage::from_pixel(W, H, Luma([255]))),
        );
        write("one-pixel.png", png_rgb(&RgbImage::new(1, 1)));
        write("bomb.png", png_claiming(60_000, 60_000));
        write("a-file", b"not a directory".to_vec());
        std::fs::write(outside.join("photo.png"), &good).unwrap();
        Inputs {
            root,
            outside,
            width: W,
            height: H,
        }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("file://{}", self.root.join(name).display())
    }

    pub fn out(&self, name: &str) -> String {
        self.uri(&format!("out/{name}"))
    }

    pub fn spec(&self, image: &str, mask: &str, output: &str) -> InpaintJobSpec {
        serde_json::from_value(serde_json::json!({
            "image": image,
            "mask": mask,
            "output": output,
            "pool": POOL,
            "steps": 4,
            "maxAttempts": 1,
        }))
        .unwrap()
    }

    pub fn good(&self, output: &str) -> InpaintJobSpec {
        self.spec(&self.uri("photo.png"), &self.uri("mask.png"), output)
    }
}

/// Serves a body over the byte limit (`limit` + 1 KiB) at `/big.png`; `/missing.png` is a 404.
pub fn http_routes(server: &Server, limit: u64) {
    server.route("/big.png", Route::ok(vec![0u8; limit as usize + 1024]));
}

/// A bad input and the reason its job must fail with.
pub struct BadCase {
    pub name: &'static str,
    pub spec: InpaintJobSpec,
    /// Reason of the failed job.
    pub reason: &'static str,
    /// The message starts with this (for retryable reasons: the original reason).
    pub message_starts: &'static str,
}

/// Every bad input of the issue (item 5) that fails before the model, with its reason.
/// `unreachable` is an http URL nobody listens on.
/// The cloud metadata endpoint: refused even where the tests allow plain http to 127.0.0.1.
pub const METADATA_URL: &str = "http://169.254.169.254/latest/meta-data";

/// Whether a job's `file://` output exists.
pub fn output_exists(spec: &InpaintJobSpec) -> bool {
    let path = spec.output.strip_prefix("file://").unwrap_or(&spec.output);
    Path::new(path).exists()
}

/// For a refused address: failed on its first attempt (not retried) and wrote nothing.
pub fn check_refused_once(c: &BadCase, rec: &JobRecord) {
    if c.reason != "AddressNotAllowed" {
        return;
    }
    assert_eq!(rec.attempt, 1, "{}: not retried: {rec:?}", c.name);
    assert!(c.spec.max_attempts > 1, "{}: retries were possible", c.name);
    assert!(!output_exists(&c.spec), "{}: no output", c.name);
}

pub fn bad_cases(inp: &Inputs, server: &Server, unreachable: &str) -> Vec<BadCase> {
    let photo = inp.uri("photo.png");
    let mask = inp.uri("mask.png");
    let out = |n: &str| inp.out(n);
    let case = |name, spec, reason, message_starts| BadCase {
        name,
        spec,
        reason,
        message_starts,
    };
    // Retries allowed: a refused address must fail on its first attempt all the same.
    let mut metadata = inp.spec(METADATA_URL, &mask, &out("n.png"));
    metadata.max_attempts = 3;
    vec![
        case(
            "truncated image",
            inp.spec(&inp.uri("truncated.png"), &mask, &out("a.png")),
            "InvalidImage",
            "photo: corrupt or truncated PNG",
        ),
        case(
            "non-image bytes",
            inp.spec(&inp.uri("text.png"), &mask, &out("b.png")),
            "InvalidImage",
            "photo: not an image",
        ),
        case(
            "mask of another size",
            inp.spec(&photo, &inp.uri("mask-wrong-aspect.png"), &out("c.png")),
            "MaskSizeMismatch",
            "mask: mask is 64×64",
        ),
        case(
            "empty mask",
            inp.spec(&photo, &inp.uri("mask-empty.png"), &out("d.png")),
            "EmptyMask",
            "mask: the mask is empty",
        ),
        case(
            "all-white mask",
            inp.spec(&photo, &inp.uri("mask-white.png"), &out("e.png")),
            "MaskCoversImage",
            "mask: the mask covers 100.0%",
        ),
        case(
            "1x1 image",
            inp.spec(&inp.uri("one-pixel.png"), &mask, &out("f.png")),
            "ImageTooSmall",
            "photo: image is 1×1",
        ),
        case(
            "decompression bomb",
            inp.spec(&inp.uri("bomb.png"), &mask, &out("g.png")),
            "ImageTooLarge",
            "photo: image is 60000×60000",
        ),
        case(
            "unreachable URL",
            inp.spec(unreachable, &mask, &out("h.png")),
            "AttemptsExhausted",
            "InputUnreachable: photo:",
        ),
        case(
            "404",
            inp.spec(&server.url("/missing.png"), &mask, &out("i.png")),
            "InputNotFound",
            "photo: http://",
        ),
        case(
            "body over the limit",
            inp.spec(&server.url("/big.png"), &mask, &out("j.png")),
            "InputTooLarge",
            "photo: http://",
        ),
        case(
            "file outside the roots",
            inp.spec(
                &format!("file://{}", inp.outside.join("photo.png").display()),
                &mask,
                &out("k.png"),
            ),
            "OutsideAllowedRoots",
            "photo: file://",
        ),
        case(
            "cloud metadata address",
            metadata,
            "AddressNotAllowed",
            "photo: http://169.254.169.254/latest/meta-data: address not allowed",
        ),
        case(
            "unsupported scheme",
            inp.spec("ftp://example.com/photo.png", &mask, &out("l.png")),
            "UnsupportedScheme",
            "photo: unsupported URI scheme \"ftp\"",
        ),
        case(
            "output not writable",
            inp.spec(&photo, &mask, &inp.uri("a-file/out.png")),
            "OutputNotWritable",
            "output: file://",
        ),
        case(
            "output format",
            inp.spec(&photo, &mask, &out("m.gif")),
            "UnsupportedOutputFormat",
            "output \"file://",
        ),
    ]
}

/// Enqueues `spec` as job `uid`.
pub async fn enqueue(queue: &Queue, uid: &str, spec: &InpaintJobSpec) {
    let created = queue
        .enqueue(&JobRef::new(uid, "pets", format!("job-{uid}")), spec)
        .await
        .unwrap();
    assert!(created.created, "{uid} enqueued once");
}

/// Waits until job `uid` is finished; panics after `timeout`.
pub async fn wait_finished(queue: &Queue, uid: &str, timeout: Duration) -> JobRecord {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(rec) = queue.get_job(POOL, uid).await.unwrap()
            && rec.state.is_terminal()
        {
            return rec;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {uid} did not finish in {timeout:?}: {:?}",
            queue.get_job(POOL, uid).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until job `uid` is in `state`.
pub async fn wait_state(queue: &Queue, uid: &str, state: JobState, timeout: Duration) -> JobRecord {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(rec) = queue.get_job(POOL, uid).await.unwrap()
            && rec.state == state
        {
            return rec;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {uid} not {state:?} in {timeout:?}: {:?}",
            queue.get_job(POOL, uid).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until job `uid` reports a denoising step.
pub async fn wait_denoising(queue: &Queue, uid: &str, timeout: Duration) -> JobRecord {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(rec) = queue.get_job(POOL, uid).await.unwrap()
            && rec.progress.as_ref().is_some_and(|p| p.stage == "denoise")
        {
            return rec;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {uid} never denoised"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every event in the stream (read through a test consumer group and acknowledged).
pub async fn all_events(queue: &Queue) -> Vec<Event> {
    let mut reader = queue.events("test-reader").await.unwrap();
    let mut out = Vec::new();
    loop {
        let batch = reader.next(1000, Duration::from_millis(50)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        reader.ack(&batch).await.unwrap();
        out.extend(batch);
    }
    out
}

pub fn of<'a>(events: &'a [Event], uid: &str, kind: EventKind) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.uid == uid && e.kind == kind)
        .collect()
}

/// Checks a finished good job: the result on disk differs from the photo only inside the
/// mask's dilation (a generous box around it), and the record has every timing.
pub fn check_result(inp: &Inputs, rec: &JobRecord, out_name: &str) {
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    let out = image::open(inp.root.join("out").join(out_name))
        .unwrap()
        .to_rgb8();
    let src = photo(inp.width, inp.height);
    assert_eq!(out.dimensions(), src.dimensions());
    let mask = leash_mask(inp.width, inp.height);
    let near_mask = |x: u32, y: u32| {
        let r = 8i64;
        (-r..=r).any(|dy| {
            (-r..=r).any(|dx| {
                let (mx, my) = (x as i64 + dx, y as i64 + dy);
                mx >= 0
                    && my >= 0
                    && (mx as u32) < inp.width
                    && (my as u32) < inp.height
                    && mask.get_pixel(mx as u32, my as u32).0[0] > 0
            })
        })
    };
    let mut changed = 0;
    for (x, y, p) in out.enumerate_pixels() {
        if p != src.get_pixel(x, y) {
            assert!(near_mask(x, y), "({x}, {y}) far from the mask changed");
            changed += 1;
        }
    }
    assert!(changed > 0, "the masked area was filled");
    let t = rec.timings.as_ref().expect("timings");
    for (stage, v) in [
        ("fetch", t.fetch),
        ("mask", t.mask),
        ("crop", t.crop),
        ("caption", t.caption),
        ("encode", t.encode),
        ("denoise", t.denoise),
        ("decode", t.decode),
        ("stitch", t.stitch),
        ("store", t.store),
        ("total", t.total),
    ] {
        assert!(v.is_some(), "timing {stage} missing: {t:?}");
    }
}
