//! Hot loops compiled twice — for the baseline x86-64 target and for AVX2 — with the AVX2 copy
//! taken where the CPU has it (checked at run time), so one portable binary gets the wide
//! vectors without `-C target-cpu`.

/// `fn name(args) -> R { body }`, plus `fn baseline(args) -> R`: the same body compiled only
/// for the baseline target (what tests compare the AVX2 copy with). Only for bodies whose
/// results cannot depend on the vector width — exact operations (min, max, compares, one
/// rounding per element), or reductions written with a fixed number of lanes — so both copies
/// give the same bits.
macro_rules! avx2_twin {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident / $baseline:ident ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }

        /// The baseline build of the function above (no AVX2).
        #[allow(dead_code)]
        $vis fn $baseline($($arg: $ty),*) -> $ret $body
    };
}
