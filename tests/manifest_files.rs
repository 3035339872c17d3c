//! Manifests and verification of the model files they name.

use lbw::model::manifest::{self, Format};
use lbw::model::{load_builtin_from, manifest::sha256_file};

#[test]
fn manifests_match_the_shared_files_and_bad_files_are_named() {
    // Every built-in manifest parses, names files that exist with the stated sha256, and gives a
    // pinned public source.
    let all = manifest::builtin().unwrap();
    assert_eq!(all.len(), 5);
    for m in &all {
        assert!(
            m.files
                .iter()
                .all(|f| f.url.starts_with("https://github.com/") && f.sha256.len() == 64)
        );
        for f in &m.files {
            assert_eq!(
                sha256_file(&m.dir().join(&f.name)).unwrap(),
                f.sha256,
                "{} {}",
                m.id,
                f.name
            );
        }
        let weights = if m.format == Format::Darknet {
            "weights"
        } else {
            "onnx"
        };
        assert_eq!(
            m.weights_sha256(),
            m.file(weights).unwrap().sha256,
            "{}",
            m.id
        );
        let classes = if m.id.ends_with("-voc") { 20 } else { 80 };
        assert_eq!(m.labels.len(), classes, "{}", m.id);
    }
    assert_eq!(
        all.iter().filter(|m| m.format == Format::Darknet).count(),
        3
    );
    let unknown = manifest::find("no-such-model").unwrap_err().to_string();
    assert!(unknown.contains("yolo-fastest-voc"), "{unknown}");

    // A copy of the model folder with a damaged weights file, and one with the file missing.
    let src = manifest::find("yolo-fastest-voc").unwrap();
    let tmp = std::env::temp_dir().join(format!("lbw-manifest-test-{}", std::process::id()));
    let dir = tmp.join("yolo-fastest-voc");
    std::fs::create_dir_all(&dir).unwrap();
    for f in &src.files {
        std::fs::copy(src.dir().join(&f.name), dir.join(&f.name)).unwrap();
    }
    let weights = dir.join("yolo-fastest.weights");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let err = load_builtin_from("yolo-fastest-voc", &tmp)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sha256")
            && err.contains("yolo-fastest.weights")
            && err.contains("github.com"),
        "{err}"
    );
    std::fs::remove_file(&weights).unwrap();
    let err = load_builtin_from("yolo-fastest-voc", &tmp)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains(lbw::paths::MODEL_DIR_VAR),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
