// What build/componentize.js uses of @bytecodealliance/componentize-js, an
// optional peer dependency: the module being built installs it, the SDK's
// own checkout does not.
declare module '@bytecodealliance/componentize-js' {
  export const version: string;
  export function componentize(opts: {
    sourcePath: string;
    witPath?: string;
    worldName?: string;
  }): Promise<{ component: Uint8Array }>;
}
