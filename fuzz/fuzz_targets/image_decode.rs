#![no_main]
// What POST /detect does with a request body before inference.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = lbw::detect::image_io::decode_rgb(data);
});
