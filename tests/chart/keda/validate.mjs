// Checks KEDA objects against KEDA's API, as the API server would with
// strict field validation: the types and required fields through the
// validators @kubernetes-models/keda generates from KEDA's API types
// (keda.sh/v1alpha1), and no field those types do not declare (read from
// the same package's type declarations, which carry every field).
//
// Usage: node validate.mjs FILE.json, where FILE holds a JSON list of
// objects; prints a JSON list with, per object, the list of problems.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const keda = join(modules, "@kubernetes-models", "keda");

// The fields of each declared interface: a .d.ts file's `export interface`
// block, one `"name"?: Type;` per field (inline object types span lines).
const declared = new Map();
function fields(file) {
  if (declared.has(file)) return declared.get(file);
  const text = readFileSync(file, "utf8");
  const imports = new Map();
  for (const m of text.matchAll(/import \{ (\w+) \} from "([^"]+)";/g)) {
    const from = m[2].startsWith(".")
      ? join(dirname(file), m[2].replace(/\.js$/, ".d.ts"))
      : join(modules, m[2] + ".d.ts");
    imports.set(m[1], from);
  }
  const block = text.match(/export interface \w+(?: extends [\w, ]+)? \{\n([\s\S]*?)\n\}/);
  // A type alias (Time, IntOrString): a value, checked by the validators.
  const out = block ? new Map() : null;
  const body = block ? block[1] : "";
  // Fields sit four spaces in, between doc comments; an inline object
  // type (`{ [key: string]: string; }`) opens on the field's line.
  for (const line of body.split("\n")) {
    const m = line.match(/^ {4}"([^"]+)"\??: (.*?);?$/);
    if (m && out) out.set(m[1], type(m[2].trim(), imports));
  }
  declared.set(file, out);
  return out;
}

function type(text, imports) {
  const array = text.match(/^Array<(\w+)>$/);
  if (array) return { array: type(array[1], imports) };
  if (imports.has(text)) {
    if (!existsSync(imports.get(text))) throw new Error(`no declaration of ${text} at ${imports.get(text)}`);
    return { object: imports.get(text) };
  }
  if (text.startsWith("{")) return { map: true };
  return { leaf: text };
}

function unknown(value, t, path, problems) {
  if (value === null || value === undefined) return;
  if (t.array && Array.isArray(value)) {
    value.forEach((v, i) => unknown(v, t.array, `${path}/${i}`, problems));
  } else if (t.object && typeof value === "object") {
    const known = fields(t.object);
    if (!known) return;
    for (const [key, v] of Object.entries(value)) {
      if (!known.has(key)) problems.push(`${path}/${key}: unknown field`);
      else unknown(v, known.get(key), `${path}/${key}`, problems);
    }
  }
}

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = [];
for (const obj of objects) {
  const problems = [];
  const [group, version] = String(obj.apiVersion).split("/");
  const model = join(keda, group, version || "", `${obj.kind}.js`);
  if (group !== "keda.sh" || !/^\w+$/.test(obj.kind || "") || !existsSync(model)) {
    results.push([`not a KEDA kind: ${obj.apiVersion} ${obj.kind}`]);
    continue;
  }
  const { [obj.kind]: Model } = await import(model);
  try {
    new Model(obj).validate();
  } catch (e) {
    problems.push(String(e.message || e));
  }
  unknown(obj, { object: model.replace(/\.js$/, ".d.ts") }, "", problems);
  results.push(problems);
}
console.log(JSON.stringify(results));
