// The input contract of a dataset's models: what a teacher receives and a trained student takes (name, shape,
// dtype, range, class order), and how to call a downloaded student. Shared by the Teachers page and the model card.
import { el } from "kd/api.js";

// Exported models take the dataset's raw inputs (the normalisation is inside the model), as float32.
export function contractOf(ds) {
  const info = ds.inspection || {};
  const shape = Array.isArray(ds.input_shape) ? ds.input_shape : [];
  const columns = (info.preview?.kind === "table" && !info.preview.columns_truncated)
    ? info.preview.columns.filter((c) => c !== info.label_column) : null;
  let values;
  if (ds.format === "builtin" && ds.name === "digits") values = "pixel values in [0, 1] (sklearn's 0–16 counts divided by 16), NCHW";
  else if (ds.is_image && ds.format !== "npz") values = "pixel values in [0, 1] (8-bit pixels divided by 255), NCHW: channels, then rows, then columns";
  else if (ds.format === "csv") values = columns
    ? `the raw numbers of columns ${columns.map((c) => `“${c}”`).join(", ")}, in file order (the label column “${info.label_column}” left out)`
    : `the raw numbers of the ${shape[0] ?? "?"} feature columns in file order (the label column${info.label_column ? ` “${info.label_column}”` : ""} left out)`;
  else if (ds.format === "npz") values = "the values of the file's x array as stored, converted to float32";
  else values = "the dataset's features as stored, converted to float32";
  const classes = Array.isArray(ds.class_names) && ds.class_names.length
    ? ds.class_names : Array.from({ length: ds.num_classes || 0 }, (_, i) => String(i));
  return { name: "input", shape: ["batch", ...shape], dtype: "float32", values, classes, output: "logits" };
}

const pyList = (xs) => `[${xs.map((x) => JSON.stringify(String(x))).join(", ")}]`;

// A copy-paste snippet calling a downloaded student: onnxruntime on the .onnx file, torch on the TorchScript one.
export function snippets(contract, files) {
  const shape = contract.shape.slice(1);
  const zeros = `np.zeros((1, ${shape.join(", ")}), dtype=np.float32)`;
  const classes = contract.classes.length <= 50 ? pyList(contract.classes) : `[...]  # ${contract.classes.length} names, in the order above`;
  const head = `import numpy as np\nclasses = ${classes}\nx = ${zeros}  # ${contract.values.split(",")[0]}`;
  return {
    onnx: `${head}\n\nimport onnxruntime as ort\nsession = ort.InferenceSession("${files.onnx}")\nlogits = session.run(["logits"], {"input": x})[0]  # shape (1, ${contract.classes.length})\nprint(classes[int(logits.argmax(1)[0])])`,
    torch: `${head}\n\nimport torch\nmodel = torch.jit.load("${files.torchscript}").eval()\nwith torch.no_grad():\n    logits = model(torch.from_numpy(x))\nprint(classes[int(logits.argmax(1)[0])])`,
  };
}

// The contract as a definition list: what goes in, what comes out.
export function contractList(contract) {
  const classText = contract.classes.length > 20
    ? `${contract.classes.slice(0, 20).join(", ")}, … (${contract.classes.length} in all)` : contract.classes.join(", ");
  return el("dl", { class: "kv", id: "input-contract" },
    el("dt", { text: "input name" }), el("dd", {}, el("code", { text: contract.name })),
    el("dt", { text: "shape" }), el("dd", {}, el("code", { text: `(${contract.shape.join(", ")})` })),
    el("dt", { text: "dtype" }), el("dd", {}, el("code", { text: contract.dtype })),
    el("dt", { text: "values" }), el("dd", { text: contract.values }),
    el("dt", { text: "output" }), el("dd", {}, el("code", { text: contract.output }), ` (batch, ${contract.classes.length}): unnormalised scores; column i is class i`),
    el("dt", { text: "class order" }), el("dd", { text: classText || "–" }));
}
