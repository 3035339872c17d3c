//! `lbw serve` over real TCP on 127.0.0.1 with the real `yolo-fastest-voc` model and a VOC photo.
//!
//! The client is a few lines of HTTP/1.1 over `std::net::TcpStream` (one request per connection,
//! `Connection: close`), so the tests see exactly the bytes a client would, and no HTTP client
//! crate has to be built. Servers run on their own tokio runtime thread.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use lbw::detect::{Detector, iou};
use lbw::serve::{self, AppState, ServeOptions};
use serde_json::Value;

const MODEL: &str = "yolo-fastest-voc";
/// Two aeroplanes in 2007_000032.jpg (500x281).
const AEROPLANES: [[f32; 4]; 2] = [[104.0, 78.0, 375.0, 183.0], [133.0, 88.0, 197.0, 123.0]];
/// Low enough that the smaller, lower-scored aeroplane box (the better-placed one) is reported.
const DETECT_QUERY: &str = "/detect?score_threshold=0.2";

fn photo() -> Vec<u8> {
    let path = lbw::paths::data_dir().join("voc2007-sample/JPEGImages/2007_000032.jpg");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client.

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "not JSON: {self:?}"
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", self.text()))
    }

    /// The `error` message of a JSON error reply, checking the shape on the way.
    fn error(&self) -> String {
        let v = self.json();
        let obj = v.as_object().expect("error body is an object");
        assert_eq!(obj.len(), 1, "error body has only `error`: {v}");
        obj["error"]
            .as_str()
            .expect("`error` is a string")
            .to_string()
    }
}

enum Body<'a> {
    Sized(&'a [u8]),
    /// Sent with `Transfer-Encoding: chunked`, so the server cannot know the size up front.
    Chunked(&'a [u8]),
}

fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let payload: Vec<u8> = match body {
        Body::Sized(b) => {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
            b.to_vec()
        }
        Body::Chunked(b) => {
            head.push_str("Transfer-Encoding: chunked\r\n");
            let mut out = Vec::with_capacity(b.len() + b.len() / 8192 * 16 + 16);
            for chunk in b.chunks(64 * 1024) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
    };
    head.push_str("\r\n");
    let mut writer = stream.try_clone().expect("clone");
    // The body goes out from another thread: a server may answer (413) and close before reading
    // it all, and the reply must still be read rather than dead-locking on a full send buffer.
    let sender = thread::spawn(move || {
        let _ = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(&payload));
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after a complete reply is the server closing on an unread body.
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("{method} {target}: read failed: {e}"),
        }
    }
    let _ = sender.join();
    parse_reply(&raw).unwrap_or_else(|e| {
        panic!(
            "{method} {target}: bad reply ({e}): {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    if parts.next() != Some("HTTP/1.1") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad status")?;
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').ok_or(format!("bad header {l:?}"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<Result<_, String>>()?;
    let rest = &raw[split + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        rest.get(..len)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("no chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("short chunk")?);
        rest = rest.get(size + 2..).ok_or("no chunk end")?;
    }
}

fn get(addr: SocketAddr, target: &str) -> Reply {
    request(addr, "GET", target, &[], Body::Sized(b""))
}

fn post(addr: SocketAddr, target: &str, content_type: &str, body: &[u8]) -> Reply {
    request(
        addr,
        "POST",
        target,
        &[("Content-Type", content_type)],
        Body::Sized(body),
    )
}

const BOUNDARY: &str = "lbw-test-boundary-7MA4YWxkTrZu0gW";

fn multipart(fields: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, content_type, data) in fields {
        out.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"{name}.bin\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn post_multipart(addr: SocketAddr, target: &str, body: &[u8]) -> Reply {
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    post(addr, target, &content_type, body)
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// Runs `serve_on` on its own runtime thread; returns the address, a shutdown trigger and the
/// thread, which yields what `serve_on` returned.
fn spawn_serve_on(
    models: Vec<String>,
    options: ServeOptions,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    thread::JoinHandle<lbw::Result<()>>,
) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx
                .send(listener.local_addr().expect("address"))
                .expect("send address");
            let stop = async move {
                let _ = stop_rx.await;
            };
            serve::serve_on(listener, models, options, stop, |line| {
                eprintln!("[server] {line}")
            })
            .await
        })
    });
    let addr = addr_rx.recv().expect("server thread bound a port");
    (addr, stop_tx, handle)
}

/// Serves a prepared state through `router` until the process ends.
fn spawn_router(state: Arc<AppState>) -> SocketAddr {
    let (addr_tx, addr_rx) = mpsc::channel();
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx
                .send(listener.local_addr().expect("address"))
                .expect("send address");
            axum::serve(listener, serve::router(state))
                .await
                .expect("serve");
        });
    });
    addr_rx.recv().expect("server thread bound a port")
}

struct SharedServer {
    addr: SocketAddr,
    /// What `serve_on` returned if it stopped (a model failed to load).
    stopped: Arc<Mutex<Option<String>>>,
}

/// The server most tests share, started the way `lbw serve` starts: bound first, the model
/// loaded in the background, default options.
fn shared_server() -> SocketAddr {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        let (addr, stop, handle) = spawn_serve_on(vec![MODEL.into()], ServeOptions::default());
        // Never sent: the shared server lives as long as the test process.
        std::mem::forget(stop);
        let stopped = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&stopped);
        thread::spawn(move || {
            let outcome = match handle.join() {
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "panicked".to_string(),
            };
            *slot.lock().expect("lock") = Some(outcome);
        });
        SharedServer { addr, stopped }
    });
    wait_ready(server.addr, || server.stopped.lock().expect("lock").clone());
    server.addr
}

fn wait_ready(addr: SocketAddr, stopped: impl Fn() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(why) = stopped() {
            panic!("the server stopped before it was ready: {why}");
        }
        let reply = get(addr, "/readyz");
        if reply.status == 200 {
            return;
        }
        assert_eq!(reply.status, 503, "readyz: {reply:?}");
        assert!(Instant::now() < deadline, "not ready after 180 s");
        thread::sleep(Duration::from_millis(50));
    }
}

fn detector() -> Arc<Detector> {
    static DETECTOR: OnceLock<Arc<Detector>> = OnceLock::new();
    DETECTOR
        .get_or_init(|| Arc::new(serve::load_variant(MODEL).expect("model loads")))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Checks of a detection reply.

fn assert_finds_aeroplane(reply: &Reply) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["variant"], "fp32");
    assert_eq!(v["engine"], "tract");
    assert_eq!(v["image"]["width"], 500);
    assert_eq!(v["image"]["height"], 281);
    for stage in ["decode", "preprocess", "inference", "postprocess", "total"] {
        let ms = v["timing_ms"][stage].as_f64().expect(stage);
        assert!(ms >= 0.0, "{stage} {ms}");
    }
    let total = v["timing_ms"]["total"].as_f64().unwrap_or_default();
    let inference = v["timing_ms"]["inference"].as_f64().unwrap_or_default();
    assert!(total >= inference, "total {total} < inference {inference}");
    let detections = v["detections"].as_array().expect("detections");
    let best = detections
        .iter()
        .filter(|d| d["label"] == "aeroplane")
        .map(|d| {
            assert_eq!(d["class_id"], 0);
            let score = d["score"].as_f64().expect("score");
            assert!((0.2..=1.0).contains(&score), "score {score}");
            let b: Vec<f32> = d["box"]
                .as_array()
                .expect("box")
                .iter()
                .map(|x| x.as_f64().expect("coordinate") as f32)
                .collect();
            let b: [f32; 4] = b.try_into().expect("four coordinates");
            AEROPLANES.iter().map(|gt| iou(&b, gt)).fold(0.0, f32::max)
        })
        .fold(0.0, f32::max);
    assert!(best >= 0.5, "best aeroplane IoU {best}: {v}");
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn multipart_upload_finds_the_aeroplanes() {
    let addr = shared_server();
    let photo = photo();
    let body = multipart(&[
        (
            "comment",
            "text/plain",
            b"fields before the image are skipped",
        ),
        ("image", "image/jpeg", &photo),
    ]);
    assert_finds_aeroplane(&post_multipart(addr, DETECT_QUERY, &body));
}

#[test]
fn raw_bodies_find_the_aeroplanes() {
    let addr = shared_server();
    let photo = photo();
    assert_finds_aeroplane(&post(addr, DETECT_QUERY, "image/jpeg", &photo));
    // Named explicitly, and sent as octet-stream: the bytes are sniffed.
    let target = format!("{DETECT_QUERY}&model={MODEL}@fp32");
    assert_finds_aeroplane(&post(addr, &target, "application/octet-stream", &photo));
    // Another format, chunked, with the type parameter a browser might add.
    let img = image::load_from_memory(&photo).expect("decodes");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .expect("PNG");
    let reply = request(
        addr,
        "POST",
        &format!("{DETECT_QUERY}&model={MODEL}"),
        &[("Content-Type", "image/png; charset=binary")],
        Body::Chunked(png.get_ref()),
    );
    assert_finds_aeroplane(&reply);
}

#[test]
fn thresholds_from_the_query_are_applied() {
    let addr = shared_server();
    let photo = photo();
    let count = |query: &str| {
        let reply = post(addr, &format!("/detect?{query}"), "image/jpeg", &photo);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["detections"]
            .as_array()
            .expect("detections")
            .len()
    };
    let loose = count("score_threshold=0.05");
    assert!(loose >= 3, "{loose} detections at score 0.05");
    assert_eq!(count("score_threshold=0.05&max_detections=2"), 2);
    assert!(count("score_threshold=0.9") < loose);
}

/// A PNG chunk with its CRC, which the decoder checks.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut covered = kind.to_vec();
    covered.extend_from_slice(data);
    out.extend_from_slice(&crc32(&covered).to_be_bytes());
    out
}

/// A valid-looking PNG of under 100 bytes that declares `width`x`height` pixels.
fn png_bomb(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    // A zlib stream of nothing: the pixels would only come from decompressing.
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// The photo with its frame header rewritten to declare `width`x`height`.
fn jpeg_declaring(photo: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = photo.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        .expect("a frame header");
    // Marker (2), length (2), precision (1), then height and width.
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

#[test]
fn bad_inputs_get_json_errors_and_the_server_keeps_serving() {
    let addr = shared_server();
    let photo = photo();
    let truncated = &photo[..photo.len() / 2];
    let png = {
        let img = image::load_from_memory(&photo).expect("decodes");
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("PNG");
        out.into_inner()
    };
    let over_limit = vec![0xFFu8; serve::DEFAULT_MAX_BODY_BYTES + 1024 * 1024];
    let jpeg = "image/jpeg";

    type Case<'a> = (&'a str, Box<dyn Fn() -> Reply + 'a>, &'a [u16]);
    let cases: Vec<Case<'_>> = vec![
        (
            "empty body",
            Box::new(|| post(addr, "/detect", jpeg, b"")),
            &[400],
        ),
        (
            "text body",
            Box::new(|| post(addr, "/detect", "text/plain", b"hello")),
            &[415],
        ),
        (
            "JSON body",
            Box::new(|| post(addr, "/detect", "application/json", b"{\"image\": 1}")),
            &[415],
        ),
        (
            "no content type, not an image",
            Box::new(|| request(addr, "POST", "/detect", &[], Body::Sized(b"hello world"))),
            &[400],
        ),
        (
            "not an image, labelled JPEG",
            Box::new(|| post(addr, "/detect", jpeg, b"definitely not a JPEG file")),
            &[400],
        ),
        (
            "TIFF, a format the decoder lacks",
            Box::new(|| {
                post(
                    addr,
                    "/detect",
                    "application/octet-stream",
                    b"II*\0\x08\0\0\0\0\0",
                )
            }),
            &[415],
        ),
        (
            "JPEG cut in half",
            Box::new(|| post(addr, "/detect", jpeg, truncated)),
            &[400],
        ),
        (
            "JPEG without its last bytes",
            Box::new(|| post(addr, "/detect", jpeg, &photo[..photo.len() - 2])),
            &[400],
        ),
        (
            "PNG cut in half",
            Box::new(|| post(addr, "/detect", "image/png", &png[..png.len() / 2])),
            &[400],
        ),
        (
            "PNG declaring 100000x100000",
            Box::new(|| {
                post(
                    addr,
                    "/detect",
                    "image/png",
                    &png_bomb(100_000, 100_000, 8, 2),
                )
            }),
            &[413, 422],
        ),
        (
            "PNG declaring 10000x10000 16-bit RGBA (800 MB decoded)",
            Box::new(|| {
                post(
                    addr,
                    "/detect",
                    "image/png",
                    &png_bomb(10_000, 10_000, 16, 6),
                )
            }),
            &[413, 422],
        ),
        (
            "JPEG declaring 60000x60000",
            Box::new(|| {
                post(
                    addr,
                    "/detect",
                    jpeg,
                    &jpeg_declaring(&photo, 60_000, 60_000),
                )
            }),
            &[413, 422],
        ),
        (
            "JPEG declaring 16000x16000",
            Box::new(|| {
                post(
                    addr,
                    "/detect",
                    jpeg,
                    &jpeg_declaring(&photo, 16_000, 16_000),
                )
            }),
            &[413, 422],
        ),
        (
            "body over the limit, length declared",
            Box::new(|| post(addr, "/detect", jpeg, &over_limit)),
            &[413],
        ),
        (
            "body over the limit, chunked",
            Box::new(|| {
                request(
                    addr,
                    "POST",
                    "/detect",
                    &[("Content-Type", jpeg)],
                    Body::Chunked(&over_limit),
                )
            }),
            &[413],
        ),
        (
            "multipart over the limit",
            Box::new(|| {
                post_multipart(addr, "/detect", &multipart(&[("image", jpeg, &over_limit)]))
            }),
            &[413],
        ),
        (
            "multipart without an image field",
            Box::new(|| post_multipart(addr, "/detect", &multipart(&[("photo", jpeg, &photo)]))),
            &[400],
        ),
        (
            "multipart with an empty image field",
            Box::new(|| post_multipart(addr, "/detect", &multipart(&[("image", jpeg, b"")]))),
            &[400],
        ),
        (
            "multipart cut short",
            Box::new(|| {
                let body = multipart(&[("image", jpeg, &photo)]);
                post_multipart(addr, "/detect", &body[..body.len() / 2])
            }),
            &[400],
        ),
        (
            "multipart without a boundary",
            Box::new(|| post(addr, "/detect", "multipart/form-data", b"--x\r\n")),
            &[400],
        ),
        (
            "unknown model",
            Box::new(|| post(addr, "/detect?model=no-such-model", jpeg, &photo)),
            &[404],
        ),
        (
            "unknown variant",
            Box::new(|| post(addr, &format!("/detect?model={MODEL}@lbw3"), jpeg, &photo)),
            &[404],
        ),
        (
            "score threshold above 1",
            Box::new(|| post(addr, "/detect?score_threshold=1.5", jpeg, &photo)),
            &[422],
        ),
        (
            "NaN IoU threshold",
            Box::new(|| post(addr, "/detect?iou_threshold=NaN", jpeg, &photo)),
            &[422],
        ),
        (
            "zero max detections",
            Box::new(|| post(addr, "/detect?max_detections=0", jpeg, &photo)),
            &[422],
        ),
        (
            "threshold that is not a number",
            Box::new(|| post(addr, "/detect?score_threshold=high", jpeg, &photo)),
            &[400],
        ),
        (
            "negative max detections",
            Box::new(|| post(addr, "/detect?max_detections=-1", jpeg, &photo)),
            &[400],
        ),
        ("GET on /detect", Box::new(|| get(addr, "/detect")), &[405]),
        (
            "unknown route",
            Box::new(|| get(addr, "/no/such/route")),
            &[404],
        ),
    ];
    for (what, send, expected) in &cases {
        let reply = send();
        assert!(
            expected.contains(&reply.status),
            "{what}: expected {expected:?}, got {} {}",
            reply.status,
            reply.text()
        );
        let message = reply.error();
        assert!(!message.is_empty(), "{what}: empty error message");
        let good = post(addr, DETECT_QUERY, jpeg, &photo);
        assert_eq!(good.status, 200, "after {what}: {}", good.text());
    }
    // The messages say what went wrong.
    let reply = post(addr, "/detect", jpeg, truncated);
    assert!(reply.error().contains("truncated"), "{reply:?}");
    let reply = post(addr, "/detect?model=no-such-model", jpeg, &photo);
    assert!(
        reply.error().contains(&format!("{MODEL}@fp32")),
        "{reply:?}"
    );
}

#[test]
fn health_readiness_and_model_list() {
    let addr = shared_server();
    let health = get(addr, "/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["models"][0], format!("{MODEL}@fp32"));

    let reply = get(addr, "/v1/models");
    assert_eq!(reply.status, 200);
    let v = reply.json();
    assert_eq!(v["ready"], true);
    let models = v["models"].as_array().expect("models");
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m["id"], MODEL);
    assert_eq!(m["variant"], "fp32");
    assert_eq!(m["engine"], "tract");
    assert!(m["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(m["input"]["width"], 320);
    assert_eq!(m["input"]["height"], 320);
    assert_eq!(m["classes"], 20);
    let labels = m["labels"].as_array().expect("labels");
    assert_eq!(labels.len(), 20);
    assert_eq!(labels[0], "aeroplane");
    assert!(m["weight_bytes"].as_u64().is_some_and(|b| b > 100_000));
    assert_eq!(m["default"], true);
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text format (version 0.0.4).

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .collect()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Labels between braces; returns them and the rest of the line after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &rest[eq + 1 + 1 + end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' at {rest:?}"));
        }
    }
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            types.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then_some(base)
    })
}

fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut finished_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(family) {
            if finished_families.iter().any(|f| f == family) {
                return Err(format!("family {family} is not contiguous"));
            }
            if let Some(prev) = current.take() {
                finished_families.push(prev);
            }
            *current = Some(family.to_string());
        }
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !is_metric_name(name) {
                        return Err(at("bad metric name".into()));
                    }
                    enter(name, &mut current).map_err(at)?;
                    let help = words.next().unwrap_or("").to_string();
                    if helps.insert(name.to_string(), help).is_some() {
                        return Err(at("second HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = words
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !is_metric_name(name) {
                        return Err(at("bad metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    enter(name, &mut current).map_err(at)?;
                    if samples
                        .iter()
                        .any(|s| family_of(&s.name, &types) == Some(name))
                    {
                        return Err(at("TYPE after samples".into()));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("second TYPE".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(inner) => parse_labels(inner).map_err(at)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| at(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &types).ok_or_else(|| at("sample without a TYPE".into()))?;
        enter(family, &mut current).map_err(at)?;
        match types[family].as_str() {
            "counter" if value < 0.0 || value.is_nan() => {
                return Err(at("negative counter".into()));
            }
            "histogram" if name.ends_with("_bucket") && !labels.contains_key("le") => {
                return Err(at("bucket without le".into()));
            }
            _ => {}
        }
        let sample = Sample {
            name: name.to_string(),
            labels,
            value,
        };
        if samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(at("duplicate series".into()));
        }
        samples.push(sample);
    }
    check_histograms(&types, &samples)?;
    Ok(Exposition { types, samples })
}

/// Buckets cumulative, ending at `+Inf`, whose count equals `_count`.
fn check_histograms(types: &HashMap<String, String>, samples: &[Sample]) -> Result<(), String> {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut key = s.labels.clone();
            let le = parse_value(&key.remove("le").unwrap_or_default())?;
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in &series {
            let mut last = (f64::NEG_INFINITY, 0.0);
            for &(le, count) in buckets {
                if le <= last.0 || count < last.1 {
                    return Err(format!("{family} {key:?}: buckets not cumulative"));
                }
                last = (le, count);
            }
            if last.0 != f64::INFINITY {
                return Err(format!("{family} {key:?}: no +Inf bucket"));
            }
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && &s.labels == key)
                .ok_or(format!("{family} {key:?}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family} {key:?}: +Inf bucket differs from _count"));
            }
            if !samples
                .iter()
                .any(|s| s.name == format!("{family}_sum") && &s.labels == key)
            {
                return Err(format!("{family} {key:?}: no _sum"));
            }
        }
    }
    Ok(())
}

#[test]
fn the_strict_parser_rejects_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n";
    assert!(parse_exposition(good).is_ok());
    for bad in [
        "a_total 1\n",
        "# TYPE a_total counter\na_total{x=1} 2\n",
        "# TYPE a_total counter\na_total{x=\"1\"} two\n",
        "# TYPE a_total counter\na_total -1\n",
        "# TYPE a_total counter\na_total 1",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE g gauge\ng 1\n# TYPE k gauge\nk 1\ng{a=\"b\"} 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_are_valid_prometheus_text_and_count_requests() {
    let addr = shared_server();
    let photo = photo();
    assert_eq!(post(addr, DETECT_QUERY, "image/jpeg", &photo).status, 200);
    assert_eq!(
        post(addr, "/detect?model=nope", "image/jpeg", &photo).status,
        404
    );
    assert_eq!(post(addr, "/detect", "text/plain", b"x").status, 415);
    assert_eq!(get(addr, "/some/random/path/12345").status, 404);

    let reply = get(addr, "/metrics");
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{reply:?}"
    );
    let text = reply.text();
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    for (name, kind) in [
        ("lbw_http_requests_total", "counter"),
        ("lbw_http_request_duration_seconds", "histogram"),
        ("lbw_inference_duration_seconds", "histogram"),
        ("lbw_model_weight_bytes", "gauge"),
        ("lbw_process_resident_memory_bytes", "gauge"),
        ("lbw_inflight_inference", "gauge"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let requests = |route: &str, method: &str, status: &str| {
        m.value(
            "lbw_http_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert!(requests("/detect", "POST", "200") >= 1.0);
    assert!(requests("/detect", "POST", "404") >= 1.0);
    assert!(requests("/detect", "POST", "415") >= 1.0);
    assert!(requests("/readyz", "GET", "200") >= 1.0);
    assert!(requests("other", "GET", "404") >= 1.0);
    // Raw paths never become labels.
    assert!(!text.contains("/some/random/path"), "{text}");

    assert!(
        m.value(
            "lbw_http_request_duration_seconds_count",
            &[("route", "/detect")]
        ) >= 3.0
    );
    for stage in serve::STAGES {
        let labels = [
            ("model", MODEL),
            ("variant", "fp32"),
            ("engine", "tract"),
            ("stage", stage),
        ];
        let found = m.find("lbw_inference_duration_seconds_count", &labels);
        assert_eq!(found.len(), 1, "{stage}");
        assert!(found[0].labels.contains_key("kernel"));
        assert!(found[0].value >= 1.0, "{stage}");
    }
    let weights = m.value(
        "lbw_model_weight_bytes",
        &[("model", MODEL), ("variant", "fp32"), ("engine", "tract")],
    );
    assert!(weights > 100_000.0, "{weights}");
    let rss = m.value("lbw_process_resident_memory_bytes", &[]);
    if cfg!(target_os = "linux") {
        assert!(rss > 10e6, "resident memory {rss}");
    }
    assert!(m.value("lbw_inflight_inference", &[]) >= 0.0);
}

#[test]
fn before_models_are_loaded_only_health_answers() {
    let state = Arc::new(AppState::new(ServeOptions::default()));
    let addr = spawn_router(Arc::clone(&state));
    assert_eq!(get(addr, "/healthz").status, 200);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.error().contains("loading"));
    let detect = post(addr, "/detect", "image/jpeg", &photo());
    assert_eq!(detect.status, 503);
    detect.error();
    let models = get(addr, "/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(
        models.json(),
        serde_json::json!({"ready": false, "models": []})
    );
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    parse_exposition(&metrics.text()).expect("valid exposition");

    // Installing makes it ready; a second install is refused.
    let warm = serve::warm_up(detector()).expect("warm-up");
    state.install(vec![warm]).expect("install");
    assert_eq!(get(addr, "/readyz").status, 200);
    let again = serve::warm_up(detector()).expect("warm-up");
    assert!(state.install(vec![again]).is_err());
    assert_finds_aeroplane(&post(addr, DETECT_QUERY, "image/jpeg", &photo()));
}

#[test]
fn a_full_inference_pool_answers_503_and_recovers() {
    let options = ServeOptions {
        inference_threads: 1,
        queue_timeout: Duration::from_millis(1),
        ..ServeOptions::default()
    };
    let state = Arc::new(AppState::new(options));
    state
        .install(vec![serve::warm_up(detector()).expect("warm-up")])
        .expect("install");
    let addr = spawn_router(state);
    let photo = Arc::new(photo());
    let mut busy = 0;
    // Eight clients at once against one slot held ~10 ms each: some must wait over 1 ms. A burst
    // is retried in case a loaded machine happened to space them out.
    for _ in 0..5 {
        let barrier = Arc::new(Barrier::new(8));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let photo = Arc::clone(&photo);
                thread::spawn(move || {
                    barrier.wait();
                    post(addr, "/detect", "image/jpeg", &photo)
                })
            })
            .collect();
        for client in clients {
            let reply = client.join().expect("client");
            match reply.status {
                200 => {}
                503 => {
                    busy += 1;
                    assert!(reply.error().contains("busy"), "{reply:?}");
                    assert_eq!(reply.header("retry-after"), Some("1"));
                }
                other => panic!("unexpected {other}: {}", reply.text()),
            }
        }
        if busy > 0 {
            break;
        }
    }
    assert!(busy > 0, "no request was refused");
    assert_finds_aeroplane(&post(addr, DETECT_QUERY, "image/jpeg", &photo));
    let metrics = parse_exposition(&get(addr, "/metrics").text()).expect("valid exposition");
    assert_eq!(metrics.value("lbw_inflight_inference", &[]), 0.0);
    assert!(
        metrics.value(
            "lbw_http_requests_total",
            &[("route", "/detect"), ("method", "POST"), ("status", "503")]
        ) >= 1.0
    );
}

#[test]
fn startup_fails_clearly_for_bad_model_specs() {
    for (models, expected) in [
        (vec!["no-such-model"], "unknown model"),
        (vec!["yolo-fastest-voc@int8"], "unknown variant"),
        (vec!["yolo-fastest-voc@"], "ID@VARIANT"),
        (
            vec!["yolo-fastest-voc", "yolo-fastest-voc@fp32"],
            "given twice",
        ),
    ] {
        let models: Vec<String> = models.into_iter().map(String::from).collect();
        let (_addr, _stop, handle) = spawn_serve_on(models.clone(), ServeOptions::default());
        let result = handle.join().expect("server thread");
        let message = result.expect_err("startup must fail").to_string();
        assert!(message.contains(expected), "{models:?}: {message}");
    }
}

#[test]
fn shutdown_lets_the_server_stop_cleanly() {
    let (addr, stop, handle) = spawn_serve_on(vec![MODEL.into()], ServeOptions::default());
    assert_eq!(get(addr, "/healthz").status, 200);
    wait_ready(addr, || None);
    assert_finds_aeroplane(&post(addr, DETECT_QUERY, "image/jpeg", &photo()));
    stop.send(()).expect("server still running");
    handle
        .join()
        .expect("server thread")
        .expect("clean shutdown");
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}

#[test]
fn model_specs_parse() {
    assert_eq!(serve::parse_model_spec("a").ok(), Some(("a", "fp32")));
    assert_eq!(serve::parse_model_spec("a@lbw6").ok(), Some(("a", "lbw6")));
    for bad in ["", "@fp32", "a@", "a@b@c"] {
        assert!(serve::parse_model_spec(bad).is_err(), "{bad:?}");
    }
    let err = serve::load_variant("yolo-fastest-voc@int8")
        .err()
        .expect("no int8 variant")
        .to_string();
    assert!(
        err.contains("unknown variant") && err.contains("fp32"),
        "{err}"
    );
}

#[test]
fn lbw_variants_load_on_the_shift_add_engine_beside_fp32() {
    let specs = vec![
        "yolo-fastest-voc".to_string(),
        "yolo-fastest-voc@lbw6".to_string(),
    ];
    assert_eq!(
        serve::check_model_specs(&specs).unwrap(),
        vec!["yolo-fastest-voc@fp32", "yolo-fastest-voc@lbw6"]
    );
    let lbw6 = serve::load_variant("yolo-fastest-voc@lbw6").unwrap();
    assert_eq!(lbw6.variant, "lbw6");
    assert_eq!(lbw6.backend().engine(), "shift-add");
    assert!(serve::load_variant("yolo-fastest-voc@lbw9").is_err());
    assert!(serve::load_variant("/no/such/model.lbw").is_err());
}
