<?php
// PHP's PDO (pdo_pgsql) through pgmux: server-side prepared statements (named pdo_stmt_*),
// which PDO deallocates with a SQL `DEALLOCATE name` when a statement object is destroyed,
// between transactions and inside them (where an error would abort the transaction); many
// connections interleaved on a small pool. Exits non-zero on any wrong result or error.
// Usage: php pdo_check.php DSN USER PASSWORD CLIENTS
[, $dsn, $user, $password, $clients] = $argv;

function check(bool $ok, string $what): void
{
    if (!$ok) {
        fwrite(STDERR, "wrong result: $what\n");
        exit(1);
    }
}

$conns = [];
for ($i = 0; $i < (int)$clients; $i++) {
    $conns[] = new PDO($dsn, $user, $password, [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
        PDO::ATTR_EMULATE_PREPARES => false,
    ]);
}
for ($round = 0; $round < 20; $round++) {
    foreach ($conns as $i => $c) {
        $st = $c->prepare('SELECT ?::int * 2, ?::text');
        $st->execute([$i * 100 + $round, "c$i"]);
        $row = $st->fetch(PDO::FETCH_NUM);
        check($row == [($i * 100 + $round) * 2, "c$i"], json_encode($row));
        $st = null; // DEALLOCATE pdo_stmt_...
        if ($round % 2 == 1) {
            $c->beginTransaction();
            $st = $c->prepare('SELECT ?::int + 1');
            $st->execute([$round]);
            check($st->fetchColumn() == $round + 1, "in a transaction");
            $st = null; // DEALLOCATE inside the transaction: it must not abort it
            $again = $c->prepare('SELECT ?::int + 2');
            $again->execute([$round]);
            check($again->fetchColumn() == $round + 2, "after DEALLOCATE in a transaction");
            $again = null;
            $c->commit();
        }
    }
}
echo "$clients clients ok\n";
