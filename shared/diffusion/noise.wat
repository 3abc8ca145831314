;; The bulk of fillNormal (shared/diffusion/philox.ts) in WebAssembly SIMD: Philox4x32-10 words and
;; the central branch of the normal transform, exactly as docs/noise.md specifies them. Every
;; operation is an exact integer operation or one IEEE-754 double operation in the specified
;; order, so the results are bit-identical to the scalar definition; philox.ts computes the few
;; tail words (log and sqrt) itself.
;;
;; Compiled to noise.wasm by `npm run gen` (scripts/gen-wasm.mjs); edit this file, not the binary.
(module
  (memory (export "memory") 1)

  ;; Philox4x32-10 of the blocks [0, blocks) with counter (block, c1, c2, c3) and key (k0, k1),
  ;; four blocks at a time in i32x4 lanes. Word j of block b is stored as u32 at
  ;; dst + 16·b + 4·j; blocks is rounded up to a multiple of 4 (the extra blocks are computed too).
  (func (export "philox") (param $k0 i32) (param $k1 i32) (param $c1 i32) (param $c2 i32) (param $c3 i32) (param $blocks i32) (param $dst i32)
    (local $b i32) (local $r i32)
    (local $x0 v128) (local $x1 v128) (local $x2 v128) (local $x3 v128) (local $key0 v128) (local $key1 v128)
    (local $pl v128) (local $ph v128) (local $lo0 v128) (local $hi0 v128) (local $lo1 v128) (local $hi1 v128)
    (local $t0 v128) (local $t1 v128) (local $t2 v128) (local $t3 v128)
    (block $done
      (loop $next_blocks
        (br_if $done (i32.ge_u (local.get $b) (local.get $blocks)))
        (local.set $x0 (i32x4.add (i32x4.splat (local.get $b)) (v128.const i32x4 0 1 2 3)))
        (local.set $x1 (i32x4.splat (local.get $c1)))
        (local.set $x2 (i32x4.splat (local.get $c2)))
        (local.set $x3 (i32x4.splat (local.get $c3)))
        (local.set $key0 (i32x4.splat (local.get $k0)))
        (local.set $key1 (i32x4.splat (local.get $k1)))
        (local.set $r (i32.const 10))
        (loop $round
          ;; p0 = M0·x0 and p1 = M1·x2 as full 64-bit products, split into low and high words.
          (local.set $pl (i64x2.extmul_low_i32x4_u (local.get $x0) (v128.const i32x4 0xd2511f53 0xd2511f53 0xd2511f53 0xd2511f53)))
          (local.set $ph (i64x2.extmul_high_i32x4_u (local.get $x0) (v128.const i32x4 0xd2511f53 0xd2511f53 0xd2511f53 0xd2511f53)))
          (local.set $lo0 (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $pl) (local.get $ph)))
          (local.set $hi0 (i8x16.shuffle 4 5 6 7 12 13 14 15 20 21 22 23 28 29 30 31 (local.get $pl) (local.get $ph)))
          (local.set $pl (i64x2.extmul_low_i32x4_u (local.get $x2) (v128.const i32x4 0xcd9e8d57 0xcd9e8d57 0xcd9e8d57 0xcd9e8d57)))
          (local.set $ph (i64x2.extmul_high_i32x4_u (local.get $x2) (v128.const i32x4 0xcd9e8d57 0xcd9e8d57 0xcd9e8d57 0xcd9e8d57)))
          (local.set $lo1 (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $pl) (local.get $ph)))
          (local.set $hi1 (i8x16.shuffle 4 5 6 7 12 13 14 15 20 21 22 23 28 29 30 31 (local.get $pl) (local.get $ph)))
          ;; (hi(p1) ^ x1 ^ k0, lo(p1), hi(p0) ^ x3 ^ k1, lo(p0)), then the key schedule.
          (local.set $x0 (v128.xor (v128.xor (local.get $hi1) (local.get $x1)) (local.get $key0)))
          (local.set $x1 (local.get $lo1))
          (local.set $x2 (v128.xor (v128.xor (local.get $hi0) (local.get $x3)) (local.get $key1)))
          (local.set $x3 (local.get $lo0))
          (local.set $key0 (i32x4.add (local.get $key0) (v128.const i32x4 0x9e3779b9 0x9e3779b9 0x9e3779b9 0x9e3779b9)))
          (local.set $key1 (i32x4.add (local.get $key1) (v128.const i32x4 0xbb67ae85 0xbb67ae85 0xbb67ae85 0xbb67ae85)))
          (local.set $r (i32.sub (local.get $r) (i32.const 1)))
          (br_if $round (local.get $r)))
        ;; 4×4 transpose: vector j holds word j of four blocks; memory wants each block's 4 words.
        (local.set $t0 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $x0) (local.get $x1)))
        (local.set $t1 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $x0) (local.get $x1)))
        (local.set $t2 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $x2) (local.get $x3)))
        (local.set $t3 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $x2) (local.get $x3)))
        (v128.store offset=0 (local.get $dst) (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t0) (local.get $t2)))
        (v128.store offset=16 (local.get $dst) (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t0) (local.get $t2)))
        (v128.store offset=32 (local.get $dst) (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t1) (local.get $t3)))
        (v128.store offset=48 (local.get $dst) (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t1) (local.get $t3)))
        (local.set $dst (i32.add (local.get $dst) (i32.const 64)))
        (local.set $b (i32.add (local.get $b) (i32.const 4)))
        (br $next_blocks))))

  ;; Acklam's central rational for two words w (as f64): p = (w + 0.5)·2^-32, q = p − 0.5,
  ;; r = q², z = (((((A0·r + A1)·r + A2)·r + A3)·r + A4)·r + A5)·q / (((((B0·r + B1)·r + B2)·r + B3)·r + B4)·r + 1).
  (func $central (param $w v128) (result v128)
    (local $q v128) (local $r v128) (local $num v128) (local $den v128)
    (local.set $q (f64x2.sub (f64x2.mul (f64x2.add (local.get $w) (v128.const f64x2 0.5 0.5)) (v128.const f64x2 0x1p-32 0x1p-32)) (v128.const f64x2 0.5 0.5)))
    (local.set $r (f64x2.mul (local.get $q) (local.get $q)))
    (local.set $num (f64x2.mul (v128.const f64x2 -3.969683028665376e1 -3.969683028665376e1) (local.get $r)))
    (local.set $num (f64x2.mul (f64x2.add (local.get $num) (v128.const f64x2 2.209460984245205e2 2.209460984245205e2)) (local.get $r)))
    (local.set $num (f64x2.mul (f64x2.add (local.get $num) (v128.const f64x2 -2.759285104469687e2 -2.759285104469687e2)) (local.get $r)))
    (local.set $num (f64x2.mul (f64x2.add (local.get $num) (v128.const f64x2 1.38357751867269e2 1.38357751867269e2)) (local.get $r)))
    (local.set $num (f64x2.mul (f64x2.add (local.get $num) (v128.const f64x2 -3.066479806614716e1 -3.066479806614716e1)) (local.get $r)))
    (local.set $num (f64x2.mul (f64x2.add (local.get $num) (v128.const f64x2 2.506628277459239 2.506628277459239)) (local.get $q)))
    (local.set $den (f64x2.mul (v128.const f64x2 -5.447609879822406e1 -5.447609879822406e1) (local.get $r)))
    (local.set $den (f64x2.mul (f64x2.add (local.get $den) (v128.const f64x2 1.615858368580409e2 1.615858368580409e2)) (local.get $r)))
    (local.set $den (f64x2.mul (f64x2.add (local.get $den) (v128.const f64x2 -1.556989798598866e2 -1.556989798598866e2)) (local.get $r)))
    (local.set $den (f64x2.mul (f64x2.add (local.get $den) (v128.const f64x2 6.680131188771972e1 6.680131188771972e1)) (local.get $r)))
    (local.set $den (f64x2.mul (f64x2.add (local.get $den) (v128.const f64x2 -1.328068155288572e1 -1.328068155288572e1)) (local.get $r)))
    (local.set $den (f64x2.add (local.get $den) (v128.const f64x2 1 1)))
    (f64x2.div (local.get $num) (local.get $den)))

  ;; For the n words at src (n rounded up to 4): the central rational of every word, rounded to
  ;; float32, at dst; and the indices of the tail words (w ≤ lowMax or w ≥ highMin, unsigned),
  ;; stored as i32 at tails. Returns how many tail indices it stored; the caller overwrites those.
  (func (export "normals") (param $src i32) (param $dst i32) (param $n i32) (param $tails i32) (param $lowMax i32) (param $highMin i32) (result i32)
    (local $e i32) (local $nt i32) (local $lane i32) (local $mask i32) (local $w v128)
    (block $done
      (loop $next_words
        (br_if $done (i32.ge_u (local.get $e) (local.get $n)))
        (local.set $w (v128.load (local.get $src)))
        (v128.store (local.get $dst)
          (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
            (f32x4.demote_f64x2_zero (call $central (f64x2.convert_low_i32x4_u (local.get $w))))
            (f32x4.demote_f64x2_zero (call $central (f64x2.convert_low_i32x4_u
              (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $w) (local.get $w)))))))
        (local.set $mask (i32x4.bitmask (v128.or
          (i32x4.le_u (local.get $w) (i32x4.splat (local.get $lowMax)))
          (i32x4.ge_u (local.get $w) (i32x4.splat (local.get $highMin))))))
        (if (local.get $mask)
          (then
            ;; Branch-free within the group: store every index, advance past the flagged ones.
            (local.set $lane (i32.const 0))
            (loop $next_lane
              (i32.store (i32.add (local.get $tails) (i32.shl (local.get $nt) (i32.const 2))) (i32.add (local.get $e) (local.get $lane)))
              (local.set $nt (i32.add (local.get $nt) (i32.and (i32.shr_u (local.get $mask) (local.get $lane)) (i32.const 1))))
              (local.set $lane (i32.add (local.get $lane) (i32.const 1)))
              (br_if $next_lane (i32.lt_u (local.get $lane) (i32.const 4))))))
        (local.set $src (i32.add (local.get $src) (i32.const 16)))
        (local.set $dst (i32.add (local.get $dst) (i32.const 16)))
        (local.set $e (i32.add (local.get $e) (i32.const 4)))
        (br $next_words)))
    (local.get $nt))
)
