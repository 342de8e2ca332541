// Live progress on a task's page, from the task's server-sent events. The page
// reads complete without this script; it only keeps status and progress fresh.
(function () {
  "use strict";
  var summary = document.getElementById("summary");
  if (!summary || !window.EventSource) { return; }
  var finished = ["completed", "failed", "cancelled"];
  var source = new EventSource(summary.dataset.events);
  source.addEventListener("task", function (event) {
    var task = JSON.parse(event.data);
    var status = document.getElementById("task-status");
    var wasFinished = finished.indexOf(status.textContent) >= 0;
    status.textContent = task.status;
    status.className = "status-" + task.status;
    document.getElementById("task-progress").value = task.progress || 0;
    document.getElementById("task-progress-text").textContent = task.progress === null ? "—" : task.progress;
    document.getElementById("task-progress-message").textContent = task.progress_message || "";
    if (finished.indexOf(task.status) >= 0) {
      source.close();
      // Result, error, timeline and the actions that apply change with the end of a run.
      if (!wasFinished) { window.location.reload(); }
    }
  });
})();
