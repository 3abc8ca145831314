// A VAE model directory's output crop (model.json `outputCrop`): the decoder applies it to PNG and
// raw outputs, images report their real size, and ListModels reports the served image size. The
// same request through an uncropped and a cropped copy of the same VAE gives the same pixels, less
// the border.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compileDecoderConfig } from '../../services/decoder/config.ts';
import { Decoder } from '../../services/decoder/decoder.ts';
import { InvalidArgumentError } from '../../shared/errors.ts';
import { ImageFormat } from '../../shared/gen/ditpipe/v1/decoder.ts';
import { SamplerKind } from '../../shared/gen/ditpipe/v1/sampler.ts';
import { cropImages, imageCropSchema, parseCrop } from '../../shared/image/crop.ts';
import { decodePng } from '../../shared/image/png.ts';
import { f32Tensor, readF32Tensor } from '../../shared/tensor.ts';
import { testModels, variantModels } from '../helpers/models.ts';
import { startPipeline, type Pipeline } from '../helpers/pipeline.ts';

describe('crop arithmetic', () => {
  it('parses N or TOP,RIGHT,BOTTOM,LEFT and keeps images square', () => {
    expect(parseCrop('2')).toEqual({ top: 2, right: 2, bottom: 2, left: 2 });
    expect(parseCrop('1,3,3,1')).toEqual({ top: 1, right: 3, bottom: 3, left: 1 });
    for (const bad of ['', '1,2', '-1', 'x', '1,2,3,4,5']) expect(parseCrop(bad), bad).toBeNull();
    expect(imageCropSchema.safeParse({ top: 1, right: 3, bottom: 3, left: 1 }).success).toBe(true);
    expect(imageCropSchema.safeParse({ top: 2, right: 1, bottom: 2, left: 1 }).error?.issues[0].message).toMatch(/as many rows/);
    expect(imageCropSchema.safeParse({ top: 1, right: 1, bottom: 1, left: 1, extra: 1 }).success).toBe(false);
  });

  it('cuts each plane of [N, C, H, W]', () => {
    const data = Float32Array.from({ length: 2 * 1 * 4 * 4 }, (_, i) => i);
    const out = cropImages({ dims: [2, 1, 4, 4], data }, { top: 1, right: 2, bottom: 2, left: 1 });
    expect(out.dims).toEqual([2, 1, 1, 1]);
    expect(Array.from(out.data)).toEqual([5, 21]);
    const c = cropImages(
      { dims: [1, 2, 3, 3], data: Float32Array.from({ length: 18 }, (_, i) => i) },
      { top: 1, right: 1, bottom: 1, left: 1 },
    );
    expect(Array.from(c.data)).toEqual([4, 13]);
    expect(() => cropImages({ dims: [1, 1, 2, 2], data: new Float32Array(4) }, { top: 1, right: 1, bottom: 1, left: 1 })).toThrow(
      RangeError,
    );
  });
});

describe('a VAE with an output crop, served', () => {
  let plain: Pipeline;
  let cropped: Pipeline;
  beforeAll(async () => {
    const { ditDir } = testModels();
    plain = await startPipeline({ transport: { kind: 'inproc' } });
    cropped = await startPipeline({ transport: { kind: 'inproc' }, models: { ditDir, vaeDir: variantModels().croppedVaeDir } });
  });
  afterAll(async () => {
    await plain?.stop();
    await cropped?.stop();
  });

  it('lists the served image size', async () => {
    expect((await plain.api.listModels()).map((m) => m.imageSize)).toEqual([32]);
    expect((await cropped.api.listModels()).map((m) => [m.imageSize, m.imageChannels])).toEqual([[28, 3]]);
  });

  it('serves 28×28 PNGs that are the 32×32 ones without their 2-px border', async () => {
    const req = {
      model: 'dit-tiny',
      classLabels: [{ index: 3 }, { index: 8 }],
      sampler: SamplerKind.SAMPLER_KIND_DDIM,
      numSteps: 3,
      cfgScale: 2,
      seed: 5n,
    };
    const [a, b] = await Promise.all([plain.api.generate(req), cropped.api.generate(req)]);
    expect(b.images.map((i) => [i.width, i.height])).toEqual([
      [28, 28],
      [28, 28],
    ]);
    for (let k = 0; k < 2; k++) {
      const big = decodePng(a.images[k].png);
      const small = decodePng(b.images[k].png);
      expect([big.width, small.width, small.height, small.channels]).toEqual([32, 28, 28, 3]);
      const border = new Uint8Array(28 * 28 * 3);
      for (let y = 0; y < 28; y++) border.set(big.data.subarray(((y + 2) * 32 + 2) * 3, ((y + 2) * 32 + 30) * 3), y * 28 * 3);
      expect(Buffer.from(small.data).equals(Buffer.from(border)), `image ${k}`).toBe(true);
    }
  });

  it('crops raw output too, and refuses latents that leave nothing after the crop', async () => {
    const plainDecoder = await Decoder.create(compileDecoderConfig({ modelDir: testModels().vaeDir, intraOpThreads: 1 }));
    const cropDecoder = await Decoder.create(compileDecoderConfig({ modelDir: variantModels().croppedVaeDir, intraOpThreads: 1 }));
    try {
      expect(cropDecoder.info.outputCrop).toEqual({ top: 2, right: 2, bottom: 2, left: 2 });
      expect(plainDecoder.info.outputCrop).toBeUndefined();
      const z = Float32Array.from({ length: 4 * 8 * 8 }, (_, i) => Math.sin(i) * 0.5);
      const raw = async (d: Decoder, name: string) =>
        readF32Tensor(
          (
            await d.decode({
              model: name,
              latents: f32Tensor([1, 4, 8, 8], z.slice()),
              format: ImageFormat.IMAGE_FORMAT_RAW,
              requestId: 't',
            })
          ).raw,
          'raw',
          [1, 3, null, null],
        );
      const full = await raw(plainDecoder, 'vae-tiny');
      const cut = await raw(cropDecoder, 'vae-tiny-crop2');
      expect(full.shape).toEqual([1, 3, 32, 32]);
      expect(cut.shape).toEqual([1, 3, 28, 28]);
      expect(Array.from(cut.data)).toEqual(
        Array.from(cropImages({ dims: full.shape, data: full.data }, { top: 2, right: 2, bottom: 2, left: 2 }).data),
      );
      const tiny = cropDecoder.decode({
        model: 'vae-tiny-crop2',
        latents: f32Tensor([1, 4, 1, 1], new Float32Array(4)),
        format: ImageFormat.IMAGE_FORMAT_PNG,
        requestId: 't',
      });
      await expect(tiny).rejects.toBeInstanceOf(InvalidArgumentError);
      await expect(tiny).rejects.toMatchObject({
        field: 'latents',
        message: expect.stringMatching(/1×1 latents decode to 4×4 images, nothing left after this VAE's output crop/),
      });
    } finally {
      await plainDecoder.close();
      await cropDecoder.close();
    }
  });
});
