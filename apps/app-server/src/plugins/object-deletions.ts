import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';

declare module 'fastify' {
  interface FastifyInstance {
    objectDeletions: {
      /**
       * Removes a queued object no row refers to (any more): at once if the store answers,
       * otherwise its entry is made due now and the sweep retries. Never throws: the caller's
       * answer does not depend on it.
       */
      discard(objectId: string): Promise<void>;
      /** Deletes the objects whose turn has come; resolves with how many are gone. */
      sweep(): Promise<number>;
    };
  }
}

const SWEEP_BATCH = 100;

/**
 * Keeps the object store in step with the `files` table through the `object_deletions` outbox
 * (migration 0010): an upload queues its object before storing it (due after the upload's deadline)
 * and its row's insert takes the entry off; a deleted row queues its object in the same
 * transaction; `discard` deletes at once, and a sweep every `sweepSeconds` deletes whatever is
 * due: a delete that failed (backing off), an upload that never got its row (A crashed).
 */
export default fp(
  async (app: FastifyInstance, options: { sweepSeconds: number }) => {
    const { objectDeletions } = app.repos;

    async function deleteObject(objectId: string): Promise<boolean> {
      try {
        await app.storage.delete(objectId);
        await objectDeletions.done(objectId);
        return true;
      } catch (error) {
        app.log.warn({ err: error, objectId }, 'object not deleted yet; the sweep retries');
        return false;
      }
    }

    async function discard(objectId: string): Promise<void> {
      if (await deleteObject(objectId)) return;
      // Queued when its upload began or its row was deleted: due now rather than later.
      await objectDeletions.queue(objectId).catch((error: unknown) => {
        app.log.warn({ err: error, objectId }, 'object stays queued for when its entry comes due');
      });
    }

    let sweeping: Promise<number> | undefined;
    async function sweepOnce(): Promise<number> {
      const due = await objectDeletions.claimDue(SWEEP_BATCH, options.sweepSeconds);
      let deleted = 0;
      for (const objectId of due) if (await deleteObject(objectId)) deleted++;
      return deleted;
    }
    function sweep(): Promise<number> {
      sweeping ??= sweepOnce().finally(() => {
        sweeping = undefined;
      });
      return sweeping;
    }

    const timer = setInterval(() => {
      sweep().catch((error: unknown) => app.log.warn({ err: error }, 'object deletion sweep failed'));
    }, options.sweepSeconds * 1000).unref();
    app.addHook('onClose', async () => {
      clearInterval(timer);
      await sweeping?.catch(() => {});
    });
    app.decorate('objectDeletions', { discard, sweep });
  },
  { name: 'object-deletions', dependencies: ['repositories', 'storage'] },
);
