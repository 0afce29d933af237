// The host interfaces of Berth's world (../../wit, `berth:sdk/capabilities`)
// as componentize-js binds them into JavaScript: kebab-case names become
// camelCase, `option<T>` is `T | undefined`, `u64` is a bigint (a number is
// converted), `list<tuple<A, B>>` an array of pairs, and an `err` result is
// thrown as an Error whose `payload` is the WIT error value.

declare module 'wasi:config/store@0.2.0-rc.1' {
  /** The `error` variant of `wasi:config/store`. */
  export type Error = { tag: 'upstream'; val: string } | { tag: 'io'; val: string };
  /** The value of `key`, or `undefined` when it is not set. Throws on a store error. */
  export function get(key: string): string | undefined;
  /** Every key and value. Throws on a store error. */
  export function getAll(): Array<[string, string]>;
}

declare module 'wasi:logging/logging@0.1.0-draft' {
  export type Level = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'critical';
  export function log(level: Level, context: string, message: string): void;
}

declare module 'berth:metrics/metrics@0.1.1' {
  export type Label = [string, string];
  export function counterAdd(name: string, value: bigint | number, labels: Label[]): void;
  export function gaugeSet(name: string, value: number, labels: Label[]): void;
  export function histogramObserve(name: string, value: number, labels: Label[]): void;
  export function histogramBuckets(name: string, buckets: Float64Array | number[]): void;
}
