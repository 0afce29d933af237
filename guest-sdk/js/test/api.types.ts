// Compile-time only (`npm run typecheck`): the implementation has the types
// index.d.ts and testing/index.d.ts declare.
import type * as Api from '../index.js';
import * as impl from '../src/index.js';
import type * as TestingApi from '../testing/index.js';
import * as testingImpl from '../testing/index.js';

export const api: typeof Api = impl;
export const testing: typeof TestingApi = testingImpl;
