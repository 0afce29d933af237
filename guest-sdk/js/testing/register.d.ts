// Side effect only: installs the test double's loader hooks.
export {};
