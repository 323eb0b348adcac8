// pgx v4 (Go) through pgmux: each client connects on its own, in one of pgx's four ways of
// running a statement, so their messages differ:
//   - prepare: the default statement cache, named statements (lrupsc_N_M) prepared with
//     Parse/Describe/Sync, then Bind/Execute; a small cache so it evicts them with a simple
//     `deallocate lrupsc_N_M`, between transactions and inside them;
//   - describe: the describe cache: an unnamed Parse/Describe/Sync once per text, then an
//     unnamed Parse/Bind/Execute each time;
//   - simple: PreferSimpleProtocol, arguments inlined into simple Queries;
//   - nocache: no cache (statement_cache_capacity=0): an unnamed Parse/Describe/Sync, then
//     Bind/Execute/Sync of the unnamed statement, a unit of its own after its Parse's Sync
//     (a PostgreSQL session keeps the unnamed statement until the next unnamed Parse).
//
// Each also sends batches (one Sync behind many statements, reads before writes, a failing one
// in the middle), explicit transactions (committed, rolled back, failed), COPY (pgx sends its
// CopyData without waiting for CopyInResponse), its own named statements (deallocated with a
// quoted name), errors that must leave the connection usable, many rows streamed; then a
// pgxpool runs many goroutines on a few connections. Every result is checked; exits
// non-zero on any wrong result or error. The tables are dropped and created here.
// Usage: pgx_check CONNSTRING CLIENTS
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgconn/stmtcache"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

const (
	items = "pgx_check_items"
	copyT = "pgx_check_copy"
	// the statement caches hold this many texts: the checks use more, so they evict
	cacheCap = 4
	// rows each client copies
	copyRows = 500
	// rows streamed from generate_series
	streamRows = 20000
)

var modes = []string{"prepare", "describe", "simple", "nocache"}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: pgx_check CONNSTRING CLIENTS")
		os.Exit(2)
	}
	connStr := os.Args[1]
	clients, err := strconv.Atoi(os.Args[2])
	if err != nil {
		fail("CLIENTS: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()

	if err := setup(ctx, connStr); err != nil {
		fail("setup: %v", err)
	}

	errs := make([]error, clients)
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = worker(ctx, connStr, i)
		}(i)
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			if failed <= 10 {
				fmt.Printf("client %d (%s): %v\n", i, modes[i%len(modes)], err)
			}
		}
	}
	if failed > 0 {
		fmt.Printf("%d of %d clients failed\n", failed, clients)
		os.Exit(1)
	}

	if err := totals(ctx, connStr, clients); err != nil {
		fail("totals: %v", err)
	}
	if err := pool(ctx, connStr, clients); err != nil {
		fail("pgxpool: %v", err)
	}
	fmt.Printf("pgx v4: %d clients ok\n", clients)
}

func fail(format string, args ...interface{}) {
	fmt.Printf(format+"\n", args...)
	os.Exit(1)
}

func setup(ctx context.Context, connStr string) error {
	c, err := pgx.Connect(ctx, connStr)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, fmt.Sprintf(
		"DROP TABLE IF EXISTS %[1]s; DROP TABLE IF EXISTS %[2]s; "+
			"CREATE TABLE %[1]s (c int, k int, v text, PRIMARY KEY (c, k)); "+
			"CREATE TABLE %[2]s (c int, n int, s text NOT NULL)", items, copyT))
	return err
}

func worker(ctx context.Context, connStr string, i int) error {
	cfg, err := pgx.ParseConfig(connStr)
	if err != nil {
		return err
	}
	switch modes[i%len(modes)] {
	case "prepare":
		cfg.BuildStatementCache = func(pc *pgconn.PgConn) stmtcache.Cache {
			return stmtcache.New(pc, stmtcache.ModePrepare, cacheCap)
		}
	case "describe":
		cfg.BuildStatementCache = func(pc *pgconn.PgConn) stmtcache.Cache {
			return stmtcache.New(pc, stmtcache.ModeDescribe, cacheCap)
		}
	case "simple":
		cfg.PreferSimpleProtocol = true
	case "nocache":
		cfg.BuildStatementCache = nil
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close(ctx)

	// a write first: through replicas, this client's later reads of the tables (created by
	// another connection) then find them, as pgmux has it read its own writes
	steps := []struct {
		name string
		run  func(context.Context, *pgx.Conn, int) error
	}{
		{"writes", writes},
		{"parameters", parameters},
		{"stream", stream},
		{"errors", errorsLeaveConnUsable},
		{"transactions", transactions},
		{"batches", batches},
		{"copy", copyFrom},
		{"named statements", named},
		{"own rows", ownRows},
	}
	for _, s := range steps {
		if err := s.run(ctx, c, i); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// itemsPerClient is what each client leaves in pgx_check_items: k 0..9 (writes), 100
// (a committed transaction), 200 (a batch), 300 (a batch in a transaction).
const itemsPerClient = 13

func writes(ctx context.Context, c *pgx.Conn, i int) error {
	for k := 0; k < 10; k++ {
		tag, err := c.Exec(ctx, "INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, k, fmt.Sprintf("v%d-%d", i, k))
		if err != nil {
			return err
		}
		if tag.String() != "INSERT 0 1" {
			return fmt.Errorf("insert tag %q", tag)
		}
	}
	return nil
}

// distinct runs more distinct texts than the cache holds (prepare mode: each eviction sends a
// `deallocate`), twice so evicted ones come back.
func distinct(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}, i int) error {
	for round := 0; round < 2; round++ {
		for k := 0; k < cacheCap*3; k++ {
			var got int
			if err := q.QueryRow(ctx, fmt.Sprintf("SELECT $1::int + %d", k), i).Scan(&got); err != nil {
				return fmt.Errorf("distinct %d: %w", k, err)
			}
			if got != i+k {
				return fmt.Errorf("distinct %d: got %d, want %d", k, got, i+k)
			}
		}
	}
	return nil
}

func parameters(ctx context.Context, c *pgx.Conn, i int) error {
	for j := 0; j < 30; j++ {
		var n int
		var s string
		if err := c.QueryRow(ctx, "SELECT $1::int * 2, $2::text", i*100+j, fmt.Sprintf("w%d", i)).Scan(&n, &s); err != nil {
			return err
		}
		if n != (i*100+j)*2 || s != fmt.Sprintf("w%d", i) {
			return fmt.Errorf("got (%d, %q) for %d", n, s, i*100+j)
		}
	}
	return distinct(ctx, c, i)
}

func stream(ctx context.Context, c *pgx.Conn, i int) error {
	rows, err := c.Query(ctx, "SELECT k, v FROM "+items+" WHERE c = $1 ORDER BY k", i)
	if err != nil {
		return err
	}
	k := 0
	for rows.Next() {
		var gotK int
		var v string
		if err := rows.Scan(&gotK, &v); err != nil {
			rows.Close()
			return err
		}
		if gotK != k || v != fmt.Sprintf("v%d-%d", i, k) {
			rows.Close()
			return fmt.Errorf("row %d: (%d, %q)", k, gotK, v)
		}
		k++
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if k != 10 {
		return fmt.Errorf("%d rows of own items, want 10", k)
	}

	rows, err = c.Query(ctx, "SELECT g, repeat('x', g % 100) FROM generate_series(1, $1::int) g", streamRows)
	if err != nil {
		return err
	}
	var count, sum, chars int64
	for rows.Next() {
		var g int64
		var s string
		if err := rows.Scan(&g, &s); err != nil {
			rows.Close()
			return err
		}
		count++
		sum += g
		chars += int64(len(s))
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var wantChars int64
	for g := int64(1); g <= streamRows; g++ {
		wantChars += g % 100
	}
	if count != streamRows || sum != streamRows*(streamRows+1)/2 || chars != wantChars {
		return fmt.Errorf("streamed %d rows, sum %d, %d chars", count, sum, chars)
	}
	return nil
}

func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// wantCode: err is PostgreSQL's error `code`.
func wantCode(err error, code, what string) error {
	if got := pgCode(err); got != code {
		return fmt.Errorf("%s: want error %s, got %v", what, code, err)
	}
	return nil
}

// usable: the connection still answers, and with the right value.
func usable(ctx context.Context, c *pgx.Conn, i int, after string) error {
	var got int
	if err := c.QueryRow(ctx, "SELECT $1::int", i).Scan(&got); err != nil || got != i {
		return fmt.Errorf("after %s: got %d, %v", after, got, err)
	}
	return nil
}

func countOwn(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}, i int) (int, error) {
	var n int
	err := q.QueryRow(ctx, "SELECT count(*) FROM "+items+" WHERE c = $1", i).Scan(&n)
	return n, err
}

func errorsLeaveConnUsable(ctx context.Context, c *pgx.Conn, i int) error {
	var x int
	err := c.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&x)
	if e := wantCode(err, "22012", "division by zero"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "division by zero"); err != nil {
		return err
	}
	_, err = c.Exec(ctx, "INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 0, "dup")
	if e := wantCode(err, "23505", "duplicate key"); e != nil {
		return e
	}
	if err := usable(ctx, c, i, "unique violation"); err != nil {
		return err
	}
	// refused at Parse, where the cached modes prepare it
	err = c.QueryRow(ctx, "SELECT $1::int FROM pgx_check_no_such_table", i).Scan(&x)
	if e := wantCode(err, "42P01", "missing table"); e != nil {
		return e
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 10 {
		return fmt.Errorf("after errors: %d own rows, %v", n, err)
	}
	return nil
}

func transactions(ctx context.Context, c *pgx.Conn, i int) error {
	insert := "INSERT INTO " + items + " (c, k, v) VALUES ($1, $2, $3)"

	// committed, with cache evictions inside it
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 100, "tx"); err != nil {
		return err
	}
	if n, err := countOwn(ctx, tx, i); err != nil || n != 11 {
		return fmt.Errorf("in transaction: %d own rows, %v", n, err)
	}
	if err := distinct(ctx, tx, i); err != nil {
		return fmt.Errorf("in transaction: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after commit: %d own rows, %v", n, err)
	}

	// rolled back
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 101, "rolled back"); err != nil {
		return err
	}
	if n, err := countOwn(ctx, tx, i); err != nil || n != 12 {
		return fmt.Errorf("before rollback: %d own rows, %v", n, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after rollback: %d own rows, %v", n, err)
	}

	// a statement fails at execution: the transaction is aborted until the rollback
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insert, i, 102, "aborted"); err != nil {
		return err
	}
	var x int
	err = tx.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&x)
	if e := wantCode(err, "22012", "division by zero in transaction"); e != nil {
		return e
	}
	_, err = tx.Exec(ctx, insert, i, 103, "aborted")
	if e := wantCode(err, "25P02", "statement in failed transaction"); e != nil {
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if err := usable(ctx, c, i, "failed transaction"); err != nil {
		return err
	}

	// one fails at Parse (prepare modes) inside a transaction
	tx, err = c.Begin(ctx)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "INSERT INTO pgx_check_no_such_table VALUES ($1)", i)
	if e := wantCode(err, "42P01", "missing table in transaction"); e != nil {
		return e
	}
	if err := tx.Rollback(ctx); err != nil {
		return err
	}
	if n, err := countOwn(ctx, c, i); err != nil || n != 11 {
		return fmt.Errorf("after failed transactions: %d own rows, %v", n, err)
	}
	return nil
}

func batches(ctx context.Context, c *pgx.Conn, i int) error {
	// a read ahead of the writes, all behind one Sync: more distinct texts than the cache
	// holds, so the prepare mode sends these unnamed
	b := &pgx.Batch{}
	b.Queue("SELECT count(*) FROM "+items+" WHERE c = $1", i)
	b.Queue("INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 200, "batch")
	b.Queue("UPDATE "+items+" SET v = $1 WHERE c = $2 AND k = $3", "batch2", i, 200)
	b.Queue("SELECT v FROM "+items+" WHERE c = $1 AND k = $2", i, 200)
	b.Queue("SELECT $1::int * 3", i)
	br := c.SendBatch(ctx, b)
	var n, triple int
	var v string
	if err := br.QueryRow().Scan(&n); err != nil || n != 11 {
		br.Close()
		return fmt.Errorf("count in batch: %d, %v", n, err)
	}
	if tag, err := br.Exec(); err != nil || tag.String() != "INSERT 0 1" {
		br.Close()
		return fmt.Errorf("insert in batch: %q, %v", tag, err)
	}
	if tag, err := br.Exec(); err != nil || tag.String() != "UPDATE 1" {
		br.Close()
		return fmt.Errorf("update in batch: %q, %v", tag, err)
	}
	if err := br.QueryRow().Scan(&v); err != nil || v != "batch2" {
		br.Close()
		return fmt.Errorf("select in batch: %q, %v", v, err)
	}
	if err := br.QueryRow().Scan(&triple); err != nil || triple != 3*i {
		br.Close()
		return fmt.Errorf("triple in batch: %d, %v", triple, err)
	}
	if err := br.Close(); err != nil {
		return err
	}

	// reads only, one text many times (prepared by name in the prepare mode)
	b = &pgx.Batch{}
	for k := 0; k < 10; k++ {
		b.Queue("SELECT $1::int * 2 + $2::int", i, k)
	}
	br = c.SendBatch(ctx, b)
	for k := 0; k < 10; k++ {
		var got int
		if err := br.QueryRow().Scan(&got); err != nil || got != 2*i+k {
			br.Close()
			return fmt.Errorf("read batch %d: %d, %v", k, got, err)
		}
	}
	if err := br.Close(); err != nil {
		return err
	}

	// one fails in the middle: what follows it up to the Sync is skipped
	b = &pgx.Batch{}
	b.Queue("SELECT $1::int + 1", i)
	b.Queue("SELECT 10 / $1::int", 0)
	b.Queue("SELECT $1::int + 2", i)
	br = c.SendBatch(ctx, b)
	var got int
	if err := br.QueryRow().Scan(&got); err != nil || got != i+1 {
		br.Close()
		return fmt.Errorf("before the failure in a batch: %d, %v", got, err)
	}
	if e := wantCode(br.QueryRow().Scan(&got), "22012", "failure in a batch"); e != nil {
		br.Close()
		return e
	}
	if err := br.QueryRow().Scan(&got); err == nil {
		br.Close()
		return fmt.Errorf("statement after a failure in a batch ran: %d", got)
	}
	br.Close()
	if err := usable(ctx, c, i, "a failed batch"); err != nil {
		return err
	}

	// a batch inside a transaction
	tx, err := c.Begin(ctx)
	if err != nil {
		return err
	}
	b = &pgx.Batch{}
	b.Queue("INSERT INTO "+items+" (c, k, v) VALUES ($1, $2, $3)", i, 300, "tx batch")
	b.Queue("SELECT count(*) FROM "+items+" WHERE c = $1", i)
	br = tx.SendBatch(ctx, b)
	if _, err := br.Exec(); err != nil {
		br.Close()
		return fmt.Errorf("insert in a transaction's batch: %w", err)
	}
	if err := br.QueryRow().Scan(&n); err != nil || n != 13 {
		br.Close()
		return fmt.Errorf("count in a transaction's batch: %d, %v", n, err)
	}
	if err := br.Close(); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

func copyFrom(ctx context.Context, c *pgx.Conn, i int) error {
	rows := make([][]interface{}, copyRows)
	for n := range rows {
		rows[n] = []interface{}{i, n, fmt.Sprintf("s%d", n)}
	}
	copied, err := c.CopyFrom(ctx, pgx.Identifier{copyT}, []string{"c", "n", "s"}, pgx.CopyFromRows(rows))
	if err != nil {
		return err
	}
	if copied != copyRows {
		return fmt.Errorf("copied %d rows", copied)
	}
	var count, sum int
	if err := c.QueryRow(ctx, "SELECT count(*), sum(n) FROM "+copyT+" WHERE c = $1", i).Scan(&count, &sum); err != nil {
		return err
	}
	if count != copyRows || sum != copyRows*(copyRows-1)/2 {
		return fmt.Errorf("after copy: %d rows, sum %d", count, sum)
	}

	// the server refuses a row (s is NOT NULL) while pgx is still sending: nothing is copied
	bad := [][]interface{}{{i, -1, "ok"}, {i, -2, nil}, {i, -3, "ok"}}
	_, err = c.CopyFrom(ctx, pgx.Identifier{copyT}, []string{"c", "n", "s"}, pgx.CopyFromRows(bad))
	if e := wantCode(err, "23502", "NULL in a NOT NULL column"); e != nil {
		return e
	}
	if err := c.QueryRow(ctx, "SELECT count(*) FROM "+copyT+" WHERE c = $1", i).Scan(&count); err != nil || count != copyRows {
		return fmt.Errorf("after a failed copy: %d rows, %v", count, err)
	}
	return nil
}

func named(ctx context.Context, c *pgx.Conn, i int) error {
	// the same name in every client
	const name = "pgx_named"
	if _, err := c.Prepare(ctx, name, "SELECT $1::text || $2::int"); err != nil {
		return err
	}
	for j := 0; j < 5; j++ {
		if modes[i%len(modes)] == "describe" {
			// pgx v4's Query with the describe cache sends the name as the statement's text
			// (a syntax error, without pgmux too); its Exec runs the named statement
			tag, err := c.Exec(ctx, name, "n", i*10+j)
			if err != nil || tag.String() != "SELECT 1" {
				return fmt.Errorf("named: %q, %v", tag, err)
			}
			continue
		}
		var s string
		if err := c.QueryRow(ctx, name, "n", i*10+j).Scan(&s); err != nil || s != fmt.Sprintf("n%d", i*10+j) {
			return fmt.Errorf("named: %q, %v", s, err)
		}
	}
	// sent as `deallocate "pgx_named"`
	if err := c.Deallocate(ctx, name); err != nil {
		return err
	}
	// the name is free again (PostgreSQL refuses a second Parse of a live name with 42P05)
	if _, err := c.Prepare(ctx, name, "SELECT $1::int - 1"); err != nil {
		return fmt.Errorf("prepare after deallocate: %w", err)
	}
	if tag, err := c.Exec(ctx, name, i); err != nil || tag.String() != "SELECT 1" {
		return fmt.Errorf("named after deallocate: %q, %v", tag, err)
	}
	return c.Deallocate(ctx, name)
}

func ownRows(ctx context.Context, c *pgx.Conn, i int) error {
	if n, err := countOwn(ctx, c, i); err != nil || n != itemsPerClient {
		return fmt.Errorf("%d own rows at the end, %v", n, err)
	}
	return nil
}

func totals(ctx context.Context, connStr string, clients int) error {
	c, err := pgx.Connect(ctx, connStr)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	// this connection wrote nothing: the hint keeps a lagging replica out of it
	var n, copied int
	err = c.QueryRow(ctx, "SELECT (SELECT count(*) FROM "+items+"), (SELECT count(*) FROM "+copyT+") /* pgmux:primary */").Scan(&n, &copied)
	if err != nil {
		return err
	}
	if n != clients*itemsPerClient || copied != clients*copyRows {
		return fmt.Errorf("%d items and %d copied rows, want %d and %d", n, copied, clients*itemsPerClient, clients*copyRows)
	}
	return nil
}

// pool: many goroutines share a few pgxpool connections (each with the default statement cache).
func pool(ctx context.Context, connStr string, clients int) error {
	cfg, err := pgxpool.ParseConfig(connStr)
	if err != nil {
		return err
	}
	cfg.MaxConns = 5
	p, err := pgxpool.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer p.Close()
	errs := make(chan error, clients*2)
	var wg sync.WaitGroup
	for g := 0; g < clients*2; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				var got int
				if err := p.QueryRow(ctx, "SELECT $1::int * 1000 + $2::int", g, j).Scan(&got); err != nil || got != g*1000+j {
					errs <- fmt.Errorf("goroutine %d: %d, %v", g, got, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	return nil
}
