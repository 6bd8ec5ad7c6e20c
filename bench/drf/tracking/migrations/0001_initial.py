from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Site",
            fields=[("id", models.UUIDField(primary_key=True, serialize=False))],
        ),
        migrations.CreateModel(
            name="Access",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("url", models.TextField()),
                ("user_id", models.CharField(db_index=True, max_length=128)),
                ("device", models.CharField(max_length=200, null=True)),
                ("user_agent", models.TextField(null=True)),
                ("received_at", models.DateTimeField(auto_now_add=True, db_index=True)),
                ("site", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="accesses", to="tracking.site")),
            ],
        ),
        migrations.CreateModel(
            name="AccessContext",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("context", models.CharField(db_index=True, max_length=100)),
                ("access", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="contexts", to="tracking.access")),
            ],
        ),
    ]
