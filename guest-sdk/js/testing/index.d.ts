// Types of @berth/sdk/testing (testing/index.js): a fake Berth host for
// unit tests. Run the tests with `node --import @berth/sdk/testing/register --test`.
// Importing this module replaces the global `fetch` with the fake host's.

import type { Handler } from '../index.js';

/** A line the module logged through `log.*`. */
export interface LogLine {
  level: 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'critical';
  context: string;
  message: string;
}

/** A metric update the host would have dropped. */
export interface Dropped {
  name: string;
  reason: 'invalid' | 'mismatch';
}

/** An outbound request the module sent with `fetch`. */
export interface Sent {
  method: string;
  url: string;
  headers: Array<[string, string]>;
  body: string;
}

export type Labels = Readonly<Record<string, string>>;

/** Forgets config, store failures, log lines, metrics, dropped updates, outbound answers and sent requests. */
export function reset(): void;

/** Sets a config value (or secret) the module reads, over those set before. */
export function setConfig(key: string, value: string): void;
/** Sets config values (or secrets) the module reads, over those set before. */
export function setConfig(values: Readonly<Record<string, string>>): void;

/** Makes every config read fail, as a store that is down would, until reset(). */
export function failConfig(message: string, kind?: 'upstream' | 'io'): void;

/** The log lines written so far, oldest first; only those at `level` if given. */
export function logs(level?: LogLine['level']): LogLine[];

/** A counter's value: the sum over all its label sets, or of the series with these labels. 0 when nothing was counted. */
export function counter(name: string, labels?: Labels): number;

/** A gauge's value in the series with these labels (default: none), or `undefined`. */
export function gauge(name: string, labels?: Labels): number | undefined;

/** The values a histogram recorded: over all its label sets, or in the series with these labels. */
export function observations(name: string, labels?: Labels): number[];

/** The bucket bounds the module chose for a histogram, if any. */
export function buckets(name: string): number[] | undefined;

/** Metric updates the host would have dropped: invalid, or a mismatch with the metric's first use. */
export function dropped(): Dropped[];

/**
 * Answers the module's outbound `fetch` calls. Without an answer, a call
 * rejects with `TypeError: NetworkError when attempting to fetch resource`,
 * as one the host refuses does; a throw from `answer` is what fetch rejects with.
 */
export function onOutbound(answer: (request: Request) => Response | Promise<Response>): void;

/** The requests the module's `fetch` sent so far, oldest first. */
export function sent(): Sent[];

/**
 * Sends a request to a handler the way the component does (a thrown error
 * becomes 500 `{"error": ...}` and an error log line). `input` is a Request,
 * a URL, or a path on `http://localhost`.
 */
export function request(handler: Handler, input: Request | URL | string, init?: RequestInit): Promise<Response>;
