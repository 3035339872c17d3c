#![no_main]
// The first bytes up to a NUL are the .cfg text, the rest the .weights payload.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    if let Ok(cfg) = std::str::from_utf8(&data[..split]) {
        let _ = lbw::model::darknet::from_bytes("fuzz", cfg, data.get(split + 1..).unwrap_or(&[]));
    }
});
