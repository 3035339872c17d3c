#![no_main]
// A hostile .lbw file must give an error, never a panic or an oversized allocation.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = lbw::model::lbw_file::LbwFile::from_bytes(data);
});
