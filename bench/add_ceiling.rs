//! The 16-bit add ceilings of this CPU's AVX-512 core, for reading the engine's "of limit"
//! column (docs/ENGINE.md): `vpaddw zmm` with a 64-byte memory operand (how the shift-add
//! kernels add a tile row) and `vpaddw zmm` between registers. Eight independent chains each,
//! reading a 1 KiB buffer that stays in L1.
//!
//! A standalone dev tool, not part of the crate:
//! `rustc -O -C target-cpu=native bench/add_ceiling.rs -o /tmp/add_ceiling && /tmp/add_ceiling`
//! Rates are per TSC cycle (the nominal clock) and per nanosecond.
use std::arch::asm;
use std::arch::x86_64::_rdtsc;
use std::time::Instant;

fn mem_adds(buf: &[u8; 1024], iters: usize) {
    let b = buf.as_ptr();
    for _ in 0..iters {
        // SAFETY: reads 1 KiB from `buf`; the caller checked AVX-512BW.
        unsafe {
            asm!(
                "vpaddw zmm0, zmm0, [{b}]", "vpaddw zmm1, zmm1, [{b}+64]",
                "vpaddw zmm2, zmm2, [{b}+128]", "vpaddw zmm3, zmm3, [{b}+192]",
                "vpaddw zmm4, zmm4, [{b}+256]", "vpaddw zmm5, zmm5, [{b}+320]",
                "vpaddw zmm6, zmm6, [{b}+384]", "vpaddw zmm7, zmm7, [{b}+448]",
                "vpaddw zmm0, zmm0, [{b}+512]", "vpaddw zmm1, zmm1, [{b}+576]",
                "vpaddw zmm2, zmm2, [{b}+640]", "vpaddw zmm3, zmm3, [{b}+704]",
                "vpaddw zmm4, zmm4, [{b}+768]", "vpaddw zmm5, zmm5, [{b}+832]",
                "vpaddw zmm6, zmm6, [{b}+896]", "vpaddw zmm7, zmm7, [{b}+960]",
                b = in(reg) b,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                out("zmm5") _, out("zmm6") _, out("zmm7") _,
            )
        }
    }
}

fn reg_adds(iters: usize) {
    for _ in 0..iters {
        // SAFETY: register-only; the caller checked AVX-512BW.
        unsafe {
            asm!(
                "vpaddw zmm0, zmm0, zmm8", "vpaddw zmm1, zmm1, zmm8", "vpaddw zmm2, zmm2, zmm8",
                "vpaddw zmm3, zmm3, zmm8", "vpaddw zmm4, zmm4, zmm8", "vpaddw zmm5, zmm5, zmm8",
                "vpaddw zmm6, zmm6, zmm8", "vpaddw zmm7, zmm7, zmm8", "vpaddw zmm0, zmm0, zmm8",
                "vpaddw zmm1, zmm1, zmm8", "vpaddw zmm2, zmm2, zmm8", "vpaddw zmm3, zmm3, zmm8",
                "vpaddw zmm4, zmm4, zmm8", "vpaddw zmm5, zmm5, zmm8", "vpaddw zmm6, zmm6, zmm8",
                "vpaddw zmm7, zmm7, zmm8",
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _,
            )
        }
    }
}

fn main() {
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
        eprintln!("needs AVX-512F and AVX-512BW");
        std::process::exit(1);
    }
    let buf = [1u8; 1024];
    let iters = 20_000_000;
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c0 = unsafe { _rdtsc() };
        f();
        let c1 = unsafe { _rdtsc() };
        (t.elapsed().as_secs_f64() * 1e9, (c1 - c0) as f64)
    };
    let ops = 16.0 * iters as f64;
    let cases: [(&str, &dyn Fn()); 2] = [
        ("vpaddw zmm, zmm, [mem]", &|| mem_adds(&buf, iters)),
        ("vpaddw zmm, zmm, zmm", &|| reg_adds(iters)),
    ];
    for (name, f) in cases {
        let (ns, cycles) = time(f);
        let per_ns = ops / ns;
        println!(
            "{name:24} {:.2} per TSC cycle, {per_ns:.2} per ns = {:.0} lane-adds per ns",
            ops / cycles,
            32.0 * per_ns
        );
    }
}
