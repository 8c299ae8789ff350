// Parameter counts of the model zoo's specs, computed in the browser so the form can show size as you edit.
// Mirrors kd_core/models.py (build_model); tests compare the two on the same specs.

const prod = (a) => a.reduce((x, y) => x * y, 1);
const linear = (i, o) => i * o + o;
const convNoBias = (cin, cout, k) => cin * cout * k * k;
const bn = (c) => 2 * c;

export function mlpParams(spec, inputShape, numClasses) {
  let d = prod(inputShape);
  let n = 0;
  for (const h of spec.hidden ?? [64]) { n += linear(d, h); d = h; }
  return n + linear(d, numClasses);
}

export function cnnParams(spec, inputShape, numClasses) {
  if (inputShape.length !== 3) throw new Error("cnn needs image input (channels × height × width)");
  let [c] = inputShape;
  let n = 0;
  // Convolutions carry no bias (BatchNorm's shift makes it redundant).
  for (const ch of spec.channels ?? [32, 64]) { n += convNoBias(c, ch, 3) + bn(ch); c = ch; }
  // Global average pooling: the head sees one value per channel whatever the image size.
  let d = c;
  for (const h of spec.hidden ?? []) { n += linear(d, h); d = h; }
  return n + linear(d, numClasses);
}

export function resnetParams(spec, inputShape, numClasses) {
  if (inputShape.length !== 3) throw new Error("resnet needs image input (channels × height × width)");
  const depth = spec.depth ?? 8;
  const width = spec.width ?? 1;
  const blocks = (depth - 2) / 6;
  if (!Number.isInteger(blocks) || blocks < 1) throw new Error("depth must be 6n+2 (8, 14, 20, 32, …)");
  let c = 16 * width;
  let n = convNoBias(inputShape[0], c, 3) + bn(c);
  [16 * width, 32 * width, 64 * width].forEach((out, stage) => {
    for (let b = 0; b < blocks; b++) {
      const down = stage > 0 && b === 0;
      n += convNoBias(c, out, 3) + bn(out) + convNoBias(out, out, 3) + bn(out);
      if (down || c !== out) n += convNoBias(c, out, 1) + bn(out);
      c = out;
    }
  });
  return n + linear(c, numClasses);
}

export function paramCount(spec, inputShape, numClasses) {
  if (!spec || !Array.isArray(inputShape) || !numClasses) return null;
  if (spec.arch === "mlp") return mlpParams(spec, inputShape, numClasses);
  if (spec.arch === "cnn") return cnnParams(spec, inputShape, numClasses);
  if (spec.arch === "resnet") return resnetParams(spec, inputShape, numClasses);
  throw new Error(`unknown arch ${spec.arch}`);
}
