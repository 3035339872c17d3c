#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = lbw::model::onnx::from_bytes("fuzz", data);
});
