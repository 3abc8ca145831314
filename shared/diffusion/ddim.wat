;; The element loop of a DDIM step (shared/diffusion/samplers.ts ddimStep) in WebAssembly SIMD, four
;; float32 lanes at a time. Each line of the scalar loop is one IEEE-754 single-precision operation
;; here (mul, sub, div, add), which is exactly what Math.fround of the double result gives for
;; float32 operands, and the clip uses pmin/pmax, which are the scalar code's ternaries (NaN and
;; -0 pass through unchanged). So the results are bit-identical to the scalar loop.
;;
;; Compiled to ddim.wasm by `npm run gen` (scripts/gen-wasm.mjs); edit this file, not the binary.
(module
  (memory (export "memory") 1)

  ;; For i in [0, n): with xt = x[i], e = eps[i] (float32 arrays at byte offsets x, eps, noise, out):
  ;;   srx = sr·xt; x0 = srx − srm1·e; if clip: x0 = min(max(x0, −1), 1)
  ;;   e' = (srx − x0) / srm1; v = x0·sqrtAbPrev + dirCoef·e'; if noisy: v = v + sigma·noise[i]
  ;;   out[i] = v
  ;; n is rounded up to a multiple of 4 (the caller leaves room; extra lanes are computed too).
  (func (export "ddim")
    (param $n i32) (param $x i32) (param $eps i32) (param $noise i32) (param $out i32)
    (param $sr f32) (param $srm1 f32) (param $sqrtAbPrev f32) (param $dirCoef f32) (param $sigma f32)
    (param $clip i32) (param $noisy i32)
    (local $i i32) (local $end i32)
    (local $vsr v128) (local $vsrm1 v128) (local $vab v128) (local $vdir v128) (local $vsigma v128)
    (local $srx v128) (local $x0 v128) (local $e v128) (local $v v128)
    (local.set $vsr (f32x4.splat (local.get $sr)))
    (local.set $vsrm1 (f32x4.splat (local.get $srm1)))
    (local.set $vab (f32x4.splat (local.get $sqrtAbPrev)))
    (local.set $vdir (f32x4.splat (local.get $dirCoef)))
    (local.set $vsigma (f32x4.splat (local.get $sigma)))
    (local.set $end (i32.shl (local.get $n) (i32.const 2)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
        (local.set $srx (f32x4.mul (local.get $vsr) (v128.load (i32.add (local.get $x) (local.get $i)))))
        (local.set $x0 (f32x4.sub (local.get $srx) (f32x4.mul (local.get $vsrm1) (v128.load (i32.add (local.get $eps) (local.get $i))))))
        (if (local.get $clip)
          (then
            (local.set $x0 (f32x4.pmax (local.get $x0) (v128.const f32x4 -1 -1 -1 -1)))
            (local.set $x0 (f32x4.pmin (local.get $x0) (v128.const f32x4 1 1 1 1)))))
        (local.set $e (f32x4.div (f32x4.sub (local.get $srx) (local.get $x0)) (local.get $vsrm1)))
        (local.set $v (f32x4.add (f32x4.mul (local.get $x0) (local.get $vab)) (f32x4.mul (local.get $vdir) (local.get $e))))
        (if (local.get $noisy)
          (then
            (local.set $v (f32x4.add (local.get $v) (f32x4.mul (local.get $vsigma) (v128.load (i32.add (local.get $noise) (local.get $i))))))))
        (v128.store (i32.add (local.get $out) (local.get $i)) (local.get $v))
        (local.set $i (i32.add (local.get $i) (i32.const 16)))
        (br $next))))
)
