// node-postgres through pgmux with named queries: Parse is sent once per connection, later
// runs send only Bind/Execute, so the statement must follow the client across servers.
// Usage: node node_pg_check.js CONNECTION_STRING CLIENTS
const { Client } = require('pg');

const [url, clients] = [process.argv[2], Number(process.argv[3])];

async function worker(i) {
  const c = new Client({ connectionString: url });
  await c.connect();
  try {
    for (let j = 0; j < 30; j++) {
      const r = await c.query({ name: 'double', text: 'SELECT $1::int * 2 AS v', values: [i * 100 + j] });
      if (r.rows[0].v !== (i * 100 + j) * 2) throw new Error(`double: ${JSON.stringify(r.rows)}`);
      const s = await c.query({ name: 'concat', text: 'SELECT $1::text || $2::text AS v', values: ['n', String(j)] });
      if (s.rows[0].v !== `n${j}`) throw new Error(`concat: ${JSON.stringify(s.rows)}`);
    }
    await c.query('BEGIN');
    const t = await c.query({ name: 'double', text: 'SELECT $1::int * 2 AS v', values: [21] });
    await c.query('COMMIT');
    if (t.rows[0].v !== 42) throw new Error('in transaction');
  } finally {
    await c.end();
  }
}

Promise.allSettled([...Array(clients).keys()].map(worker)).then((results) => {
  const errors = results.map((r, i) => (r.status === 'rejected' ? `client ${i}: ${r.reason}` : null)).filter(Boolean);
  if (errors.length) {
    console.log(errors.slice(0, 10).join('\n'));
    process.exit(1);
  }
  console.log(`node-postgres: ${clients} clients ok`);
});
