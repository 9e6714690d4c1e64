import type { Pool, PoolClient } from 'pg';

/**
 * Runs `work` on one connection inside `BEGIN` … `COMMIT`, rolling back if it throws. The
 * repositories' one transaction helper: what must be atomic across replicas happens here.
 */
export async function inTransaction<T>(db: Pool, work: (client: PoolClient) => Promise<T>): Promise<T> {
  const client = await db.connect();
  try {
    await client.query('BEGIN');
    const result = await work(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}
