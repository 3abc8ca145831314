// Waiting for something with a bound: the drains of a shutdown wait for work in flight at most a grace.

/** Resolves true once `done` settles (fulfilled or rejected), or false after `ms`, whichever is first. */
export async function settledWithin(done: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      done.then(
        () => true,
        () => true,
      ),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
